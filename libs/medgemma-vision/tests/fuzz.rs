//! Fuzz-ish: random mutations of valid files never panic, in our code or in the decoders we
//! call. (decode_image also turns a decoder panic into an error; the hook here counts panics
//! even when they are caught, so that one would still fail this test.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use medgemma_vision::{DecodeOptions, decode_image};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MUTATIONS: usize = 200;

fn mutate(rng: &mut ChaCha8Rng, original: &[u8]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = bytes.len().max(1);
        match rng.random_range(0..6) {
            // Flip a few bits.
            0 => {
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..len);
                    if let Some(b) = bytes.get_mut(i) {
                        *b ^= 1 << rng.random_range(0..8);
                    }
                }
            }
            // Random bytes.
            1 => {
                let i = rng.random_range(0..len);
                for b in bytes.iter_mut().skip(i).take(rng.random_range(1..16)) {
                    *b = rng.random();
                }
            }
            // A length-like field set to an extreme.
            2 => {
                let i = rng.random_range(0..len);
                let v: [u8; 4] = match rng.random_range(0..3) {
                    0 => [0xFF; 4],
                    1 => [0; 4],
                    _ => [0xF0, 0xFF, 0xFF, 0x7F],
                };
                for (b, v) in bytes.iter_mut().skip(i).zip(v) {
                    *b = v;
                }
            }
            // Truncate.
            3 => {
                let cut = rng.random_range(0..len);
                bytes.truncate(cut);
            }
            // Duplicate a slice in place.
            4 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..64).min(bytes.len().saturating_sub(i));
                let chunk: Vec<u8> = bytes[i..i + n].to_vec();
                let at = rng.random_range(0..len).min(bytes.len());
                bytes.splice(at..at, chunk);
            }
            // Delete a slice.
            _ => {
                let i = rng.random_range(0..len).min(bytes.len());
                let n = rng.random_range(1..64).min(bytes.len() - i);
                bytes.drain(i..i + n);
            }
        }
    }
    bytes
}

#[test]
fn mutated_files_never_panic() {
    let panics = Arc::new(AtomicUsize::new(0));
    let counter = panics.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counter.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let opts = DecodeOptions::default();
    let mut summary = Vec::new();
    for (seed, file) in [
        "gradient.png",
        "exif_420.jpg",
        "MR_small.dcm",
        "MR_small_jp2klossless.dcm",
        "SC_rgb_rle.dcm",
        "JPEG-LL.dcm",
        "MR_small_bigendian.dcm",
    ]
    .into_iter()
    .enumerate()
    {
        let original = common::blob(file);
        let mut rng = ChaCha8Rng::seed_from_u64(seed as u64 + 1);
        let (mut ok, mut err) = (0, 0);
        for _ in 0..MUTATIONS {
            let bytes = mutate(&mut rng, &original);
            match decode_image(&bytes, &opts) {
                Ok(img) => {
                    assert!(img.width() > 0 && img.height() > 0);
                    ok += 1;
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    err += 1;
                }
            }
        }
        summary.push(format!("{file}: {ok} decoded, {err} errors"));
    }
    let _ = std::panic::take_hook();
    eprintln!("{summary:#?}");
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "a decoder panicked (see stderr)"
    );
}
