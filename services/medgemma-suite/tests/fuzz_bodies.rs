//! The fuzz targets' bodies (`fuzz/bodies/`, the code `cargo fuzz` drives with libFuzzer in
//! `scripts/fuzz.sh`) run here, in the ordinary test build, over their committed seeds
//! (`fuzz/corpus/<target>/`) and then over seeded random mutations of them (bit flips, byte
//! insertions and deletions, truncations, splices, repeated runs, interesting values) for
//! `MEDGEMMA_FUZZ_SECS` seconds per target (default 8). No coverage guidance: quick and
//! deterministic, in the ordinary test build; `scripts/test.sh` then runs the libFuzzer drivers
//! of the same bodies for 30 s each. A body that panics fails the test, and the input is written
//! to `fuzz/artifacts/<target>/` to become a regression seed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medgemma_tokenizer::Tokenizer;

#[path = "../../../fuzz/bodies/chat_template.rs"]
mod chat_template;
#[path = "../../../fuzz/bodies/decode_image.rs"]
mod decode_image;
#[path = "../../../fuzz/bodies/dicom.rs"]
mod dicom;
#[path = "../../../fuzz/bodies/json_repair.rs"]
mod json_repair;
#[path = "../../../fuzz/bodies/validate.rs"]
mod validate;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed seeds of `target`, sorted by name.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = repo().join("fuzz/corpus").join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds for {target}");
    seeds
}

/// xorshift64*: deterministic per target, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to eight random edits of a seed (sometimes spliced with another).
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    const INTERESTING: [&[u8]; 8] = [
        &[0x00],
        &[0xFF],
        &[0x7F],
        &[0x80],
        &[0xFF, 0xFF, 0xFF, 0xFF],
        &[0x00, 0x00, 0x00, 0x80],
        b"\xFE\xFF\x00\xE0",
        b"{\"",
    ];
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(8) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(len + 1);
                data.insert(i, rng.next() as u8);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below((len - i).min(64)) + 1;
                data.drain(i..i + n);
            }
            3 if len > 0 => data.truncate(rng.below(len)),
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below((len - i).min(32)) + 1;
                let run = data[i..i + n].to_vec();
                for _ in 0..rng.below(16) + 1 {
                    data.splice(i..i, run.iter().copied());
                }
            }
            _ => {
                let i = rng.below(len + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let end = (i + v.len()).min(len);
                data.splice(i..end, v.iter().copied());
            }
        }
        data.truncate(1 << 20);
    }
    data
}

/// Runs `body` over `target`'s seeds, then over mutations for the time budget. Returns the
/// number of inputs run.
fn exercise(target: &str, seed: u64, body: impl Fn(&[u8])) -> usize {
    let budget = Duration::from_secs_f64(
        std::env::var("MEDGEMMA_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8.0),
    );
    let seeds = seeds(target);
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let mut runs = 0;
    let mut next = 0;
    while next < seeds.len() || started.elapsed() < budget {
        let input = if next < seeds.len() {
            next += 1;
            seeds[next - 1].clone()
        } else {
            mutate(&mut rng, &seeds)
        };
        // A body that panics has shown the bug; nothing of its state is used afterwards.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&input))).is_err() {
            let dir = repo().join("fuzz/artifacts").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("crash-{runs}"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "{target}: input {runs} panicked; saved to {}",
                path.display()
            );
        }
        runs += 1;
    }
    println!("{target}: {runs} inputs in {:.1?}", started.elapsed());
    runs
}

#[test]
fn json_repair_survives_its_seeds_and_their_mutations() {
    assert!(exercise("json_repair", 1, json_repair::run) > 0);
}

#[test]
fn validation_survives_its_seeds_and_their_mutations() {
    assert!(exercise("validate", 2, validate::run) > 0);
}

#[test]
fn image_decoding_survives_its_seeds_and_their_mutations() {
    assert!(exercise("decode_image", 3, decode_image::run) > 0);
}

#[test]
fn dicom_decoding_survives_its_seeds_and_their_mutations() {
    assert!(exercise("dicom", 4, dicom::run) > 0);
}

#[test]
fn chat_templating_survives_its_seeds_and_their_mutations() {
    let tokenizer =
        Tokenizer::from_path(repo().join("fixtures/tiny-27b-text")).expect("the fixture tokenizer");
    assert!(
        exercise("chat_template", 5, |data| chat_template::run(
            &tokenizer, data
        )) > 0
    );
}
