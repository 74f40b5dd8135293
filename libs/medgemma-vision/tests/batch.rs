//! `VisionEncoder::encode_bytes_batch`: several images, one tower forward, the same embeddings
//! as one image at a time; an image that does not decode fails alone.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use medgemma_vision::{DecodeOptions, VisionEncoder, VisionError};

/// The batched forward must reproduce the one-at-a-time embeddings to this.
const TOL: f32 = 1e-5;

use medgemma_test_support::repo_root as root;

/// Different images of every kind the service takes: PNGs of three aspect ratios, a JPEG
/// with EXIF orientation, and two DICOM objects (CT, MR).
fn images() -> Vec<(&'static str, Vec<u8>)> {
    let data = root().join("libs/medgemma-vision/tests/data");
    let read = |p: PathBuf| medgemma_test_support::read(p);
    vec![
        (
            "gradient_90x60.png",
            read(root().join("fixtures/images/gradient_90x60.png")),
        ),
        ("tall.png", read(root().join("fixtures/images/tall.png"))),
        (
            "exif_420.jpg",
            read(root().join("fixtures/images/exif_420.jpg")),
        ),
        (
            "CT_small.dcm",
            read(root().join("fixtures/images/CT_small.dcm")),
        ),
        ("wide.png", read(data.join("wide.png"))),
        ("MR_small.dcm", read(data.join("MR_small.dcm"))),
    ]
}

/// PNG magic, then nothing a decoder can read.
fn broken_png() -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend_from_slice(&[0x5a; 64]);
    b
}

/// Encodes every image alone and all of them (with a broken one in the middle) in one batch.
fn check_batch_equals_alone(enc: &VisionEncoder) {
    let opts = DecodeOptions::default();
    let imgs = images();
    let alone: Vec<Tensor> = imgs
        .iter()
        .map(|(_, b)| enc.encode_bytes(b, &opts).unwrap())
        .collect();
    let broken = broken_png();
    let mut batch: Vec<(&[u8], DecodeOptions)> = imgs
        .iter()
        .map(|(_, b)| (b.as_slice(), opts.clone()))
        .collect();
    batch.insert(3, (broken.as_slice(), opts.clone()));
    let mut got = enc.encode_bytes_batch(&batch).unwrap();
    assert_eq!(got.len(), imgs.len() + 1);
    let err = got.remove(3).unwrap_err();
    assert!(
        matches!(err, VisionError::Corrupt { .. }),
        "the broken PNG: {err}"
    );
    let cfg = enc.config();
    for (((name, _), want), got) in imgs.iter().zip(&alone).zip(got) {
        let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.dims(), &[cfg.mm_tokens_per_image, cfg.text_hidden_size]);
        let d = common::max_abs_diff(&got, want);
        assert!(d <= TOL, "{name}: batched embeddings differ by {d}");
    }
    // The images are really different: a mix-up of rows would not pass unnoticed.
    for i in 0..alone.len() {
        for j in i + 1..alone.len() {
            let d = common::max_abs_diff(&alone[i], &alone[j]);
            assert!(
                d > 1e-3,
                "{} and {} encode alike ({d})",
                imgs[i].0,
                imgs[j].0
            );
        }
    }
}

#[test]
fn tiny_4b_batch_equals_one_at_a_time() {
    let enc =
        VisionEncoder::load(&root().join("fixtures/tiny-4b"), &Device::Cpu, DType::F32).unwrap();
    check_batch_equals_alone(&enc);
}

#[test]
fn demo_tower_batch_equals_one_at_a_time() {
    let enc = VisionEncoder::demo(640, 3, &Device::Cpu, DType::F32).unwrap();
    check_batch_equals_alone(&enc);
}

#[test]
fn a_batch_of_undecodable_images_runs_no_forward_and_fails_each() {
    let enc = VisionEncoder::demo(64, 0, &Device::Cpu, DType::F32).unwrap();
    let broken = broken_png();
    let opts = DecodeOptions::default();
    let frame_9 = DecodeOptions {
        frame: 9,
        ..opts.clone()
    };
    let png = std::fs::read(root().join("fixtures/images/gradient_90x60.png")).unwrap();
    let got = enc
        .encode_bytes_batch(&[(&broken, opts.clone()), (&png, frame_9)])
        .unwrap();
    assert!(matches!(got[0], Err(VisionError::Corrupt { .. })));
    assert!(
        matches!(got[1], Err(VisionError::FrameOutOfRange { .. })),
        "{:?}",
        got[1].as_ref().err()
    );
    assert!(enc.encode_bytes_batch(&[]).unwrap().is_empty());
}
