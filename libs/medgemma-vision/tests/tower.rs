//! The SigLIP tower and Gemma 3 projector against transformers (fixtures/tiny-4b, made by
//! tools/fixtures/make_fixtures.py): 56 px images, patch 7 (8 x 8 patches), 16 soft tokens, so
//! the projector pools with a 2 x 2 kernel; a non-square source image.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use medgemma_vision::{DecodeOptions, VisionEncoder, VisionError, VisionModelConfig};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    medgemma_test_support::fixture("")
}

fn golden(name: &str) -> Tensor {
    medgemma_test_support::golden("tiny-4b")
        .tensor(name)
        .clone()
}

fn encoder() -> VisionEncoder {
    VisionEncoder::load(&fixtures().join("tiny-4b"), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn config_gives_a_pooling_kernel_of_two() {
    let cfg = VisionModelConfig::from_hf_dir(&fixtures().join("tiny-4b")).unwrap();
    assert_eq!(cfg.vision.patches_per_side(), 8);
    assert_eq!(cfg.mm_tokens_per_image, 16);
    assert_eq!(
        medgemma_vision::Projector::kernel_size(&cfg.vision, cfg.mm_tokens_per_image).unwrap(),
        2
    );
    assert_eq!(cfg.text_hidden_size, 64);
    assert_eq!(cfg.image_token_index, 716);
}

#[test]
fn tower_and_projector_match_transformers_on_golden_pixels() {
    let enc = encoder();
    let pv = golden("image_chat.pixel_values");
    let tower = enc.tower_output(&pv).unwrap();
    let want = golden("image_chat.vision_tower").unsqueeze(0).unwrap();
    let d = common::max_abs_diff(&tower, &want);
    assert!(d <= TOL, "vision tower differs by {d}");
    let feats = enc.encode_pixels(&pv).unwrap();
    let want = golden("image_chat.image_features").unsqueeze(0).unwrap();
    let d = common::max_abs_diff(&feats, &want);
    assert!(d <= TOL, "projected embeddings differ by {d}");
}

#[test]
fn file_to_embeddings_matches_transformers() {
    // Our decoder + PIL-exact resize on the same PNG transformers read.
    let enc = encoder();
    let bytes = std::fs::read(fixtures().join("images/gradient_90x60.png")).unwrap();
    let img = medgemma_vision::decode_image(&bytes, &DecodeOptions::default()).unwrap();
    let pv = medgemma_vision::to_pixel_values(&img, 56)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let d = common::max_abs_diff(&pv, &golden("image_chat.pixel_values"));
    assert!(
        d <= 2.0 / 255.0 + 1e-6,
        "pixel values differ by {d} (> one 8-bit level)"
    );
    let feats = enc.encode_bytes(&bytes, &DecodeOptions::default()).unwrap();
    let d = common::max_abs_diff(&feats, &golden("image_chat.image_features"));
    assert!(d <= TOL, "embeddings from the file differ by {d}");
}

#[test]
fn bf16_tower_stays_close() {
    let enc = VisionEncoder::load(&fixtures().join("tiny-4b"), &Device::Cpu, DType::BF16).unwrap();
    let feats = enc
        .encode_pixels(&golden("image_chat.pixel_values"))
        .unwrap();
    let want = golden("image_chat.image_features").unsqueeze(0).unwrap();
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = common::max_abs_diff(&feats, &want);
    assert!(
        d <= 0.05 * scale,
        "bf16 embeddings differ by {d} (scale {scale})"
    );
}

#[test]
fn batch_of_two_equals_one_at_a_time() {
    let enc = encoder();
    let pv = golden("image_chat.pixel_values");
    let flipped = pv.flip(&[3]).unwrap();
    let both = enc
        .encode_pixels(&Tensor::cat(&[&pv, &flipped], 0).unwrap())
        .unwrap();
    let a = enc.encode_pixels(&pv).unwrap();
    let b = enc.encode_pixels(&flipped).unwrap();
    assert!(common::max_abs_diff(&both.get(0).unwrap(), &a.get(0).unwrap()) == 0.0);
    assert!(common::max_abs_diff(&both.get(1).unwrap(), &b.get(0).unwrap()) == 0.0);
    assert!(
        common::max_abs_diff(&a, &b) > 1e-3,
        "a mirrored image gave the same embeddings"
    );
}

#[test]
fn demo_tower_is_deterministic_and_sized_to_the_decoder() {
    let a = VisionEncoder::demo(640, 7, &Device::Cpu, DType::F32).unwrap();
    assert!(a.is_random());
    let cfg = a.config();
    assert_eq!((cfg.mm_tokens_per_image, cfg.text_hidden_size), (64, 640));
    let bytes = std::fs::read(fixtures().join("images/gradient_90x60.png")).unwrap();
    let e1 = a.encode_bytes(&bytes, &DecodeOptions::default()).unwrap();
    assert_eq!(e1.dims(), &[64, 640]);
    let b = VisionEncoder::demo(640, 7, &Device::Cpu, DType::F32).unwrap();
    let e2 = b.encode_bytes(&bytes, &DecodeOptions::default()).unwrap();
    assert_eq!(common::max_abs_diff(&e1, &e2), 0.0);
    let std = e1
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!(
        std.is_finite() && std > 1e-3,
        "demo embeddings are degenerate ({std})"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let enc = encoder();
    let wrong = Tensor::zeros((1, 3, 57, 56), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        enc.encode_pixels(&wrong),
        Err(VisionError::InvalidArgument(_))
    ));
    let e = enc
        .encode_bytes(b"not an image", &DecodeOptions::default())
        .unwrap_err();
    assert!(matches!(e, VisionError::UnknownFormat), "{e}");
    let e = VisionEncoder::load(&fixtures().join("tiny-27b-text"), &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(e.to_string().contains("vision_config"), "{e}");
    let e = VisionEncoder::load(&fixtures().join("tiny-4b"), &Device::Cpu, DType::F16).unwrap_err();
    assert!(e.to_string().contains("f16"), "{e}");
}

#[test]
fn prompt_logits_with_our_embeddings_match_transformers() {
    let enc = encoder();
    let feats = enc
        .encode_pixels(&golden("image_chat.pixel_values"))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let model = medgemma_model::Gemma3::load(
        &fixtures().join("tiny-4b"),
        &medgemma_model::LoadOptions::default(),
    )
    .unwrap();
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tiny-4b/golden.json")).unwrap())
            .unwrap();
    let case = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "image_chat")
        .unwrap();
    let prompt: Vec<u32> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let (logits, _) = model
        .forward_with_hidden_states(&prompt, Some(&feats))
        .unwrap();
    let d = common::max_abs_diff(&logits, &golden("image_chat.logits"));
    assert!(d <= TOL, "prompt logits differ by {d}");
}
