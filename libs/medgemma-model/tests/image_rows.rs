//! Image embeddings spliced at image-token rows and the same-image bidirectional mask.
//! (Reference parity of the whole image path is the vision issue's; this checks the decoder's
//! part of the contract on the tiny reference weights, configured as a multimodal model.)

mod common;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, repo_root};
use medgemma_model::{Gemma3, KvCacheConfig, LoadOptions, LogitsRows, SeqInput};

const IMG: u32 = 700;

/// The tiny 27B-text weights behind a Gemma3ForConditionalGeneration-style config.
fn multimodal() -> (tempfile::TempDir, Gemma3) {
    let src = repo_root().join("fixtures/tiny-27b-text");
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text, "vision_config": {"hidden_size": 32},
        "boi_token_index": 701, "eoi_token_index": 702, "image_token_index": IMG, "mm_tokens_per_image": 12
    });
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    let m = Gemma3::load(tmp.path(), &LoadOptions::default()).unwrap();
    (tmp, m)
}

/// 4 text tokens, 12 image tokens, 5 text tokens.
fn prompt() -> Vec<u32> {
    let mut p = vec![2, 571, 606, 701];
    p.extend(std::iter::repeat_n(IMG, 12));
    p.extend([702, 559, 402, 558, 572]);
    p
}

fn embeds(seed: f64) -> Tensor {
    let v: Vec<f32> = (0..12 * 64)
        .map(|i| ((i as f64 * 0.37 + seed).sin() * 2.0) as f32)
        .collect();
    Tensor::from_vec(v, (12, 64), &Device::Cpu).unwrap()
}

fn rows(t: &Tensor, a: usize, n: usize) -> Tensor {
    t.narrow(0, a, n).unwrap()
}

#[test]
fn image_rows_take_the_given_embeddings_unscaled() {
    let (_d, m) = multimodal();
    let e = embeds(0.0);
    let (_, hidden) = m.forward_with_hidden_states(&prompt(), Some(&e)).unwrap();
    assert_eq!(max_abs_diff(&rows(&hidden[0], 4, 12), &e), 0.0);
    // Text rows are the scaled token embeddings, the same as in a text-only run.
    let (_, text_only) = m
        .forward_with_hidden_states(&[2, 571, 606, 701], None)
        .unwrap();
    assert_eq!(max_abs_diff(&rows(&hidden[0], 0, 4), &text_only[0]), 0.0);
}

#[test]
fn image_tokens_see_each_other_both_ways_and_text_stays_causal() {
    let (_d, m) = multimodal();
    let p = prompt();
    let e1 = embeds(0.0);
    // Change only the last image row.
    let mut v: Vec<f32> = e1.flatten_all().unwrap().to_vec1().unwrap();
    for x in &mut v[11 * 64..] {
        *x += 3.0;
    }
    let e2 = Tensor::from_vec(v, (12, 64), &Device::Cpu).unwrap();
    let (l1, _) = m.forward_with_hidden_states(&p, Some(&e1)).unwrap();
    let (l2, _) = m.forward_with_hidden_states(&p, Some(&e2)).unwrap();
    // Rows before the image never see it.
    assert_eq!(max_abs_diff(&rows(&l1, 0, 4), &rows(&l2, 0, 4)), 0.0);
    // The first image row sees the last one (bidirectional within the image).
    assert!(max_abs_diff(&rows(&l1, 4, 1), &rows(&l2, 4, 1)) > 1e-3);
    // Text after the image sees it.
    assert!(max_abs_diff(&rows(&l1, 16, 5), &rows(&l2, 16, 5)) > 1e-3);
    // Changing text after the image does not reach back into the image rows.
    let mut p2 = p.clone();
    *p2.last_mut().unwrap() = 600;
    let (l3, _) = m.forward_with_hidden_states(&p2, Some(&e1)).unwrap();
    assert_eq!(max_abs_diff(&rows(&l1, 0, 20), &rows(&l3, 0, 20)), 0.0);
}

#[test]
fn decode_after_an_image_prompt_equals_recompute_and_counts_are_checked() {
    let (_d, m) = multimodal();
    let p = prompt();
    let e = embeds(1.0);
    let mut kv = m.new_kv_cache(KvCacheConfig {
        block_size: 4,
        max_bytes: None,
        paged_blocks: None,
    });
    let mut s = kv.new_sequence();
    m.forward(
        &mut kv,
        &mut [SeqInput {
            kv: &mut s,
            tokens: &p,
            image_embeds: Some(&e),
            logits: LogitsRows::Last,
        }],
    )
    .unwrap();
    let step = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s,
                tokens: &[589],
                image_embeds: None,
                logits: LogitsRows::Last,
            }],
        )
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let mut full = p.clone();
    full.push(589);
    let (all, _) = m.forward_with_hidden_states(&full, Some(&e)).unwrap();
    let d = max_abs_diff(&step, &rows(&all, full.len() - 1, 1));
    assert!(
        d <= 1e-4,
        "cached decode after image prefill differs by {d}"
    );
    // Wrong number of embedding rows, or embeddings missing: clear errors.
    let mut s2 = kv.new_sequence();
    let short = embeds(0.0).narrow(0, 0, 11).unwrap();
    let err = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s2,
                tokens: &p,
                image_embeds: Some(&short),
                logits: LogitsRows::Last,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("12 image tokens") && err.contains("11"),
        "{err}"
    );
    let err = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s2,
                tokens: &p,
                image_embeds: None,
                logits: LogitsRows::Last,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("12 image tokens"), "{err}");
}
