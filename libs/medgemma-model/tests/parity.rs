//! Parity with the reference (transformers 5.24, f32, eager attention) on tiny random models in
//! the real checkpoint layouts. Fixtures come from tools/fixtures/make_fixtures.py.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{Golden, argmax, case, golden, ids, max_abs_diff, repo_root};
use medgemma_model::{Gemma3, KvCacheConfig, LoadOptions, LogitsRows, ModelDType, SeqInput};

const TOL: f32 = 1e-4;

fn load(model: &str, dtype: ModelDType) -> Gemma3 {
    let dir = repo_root().join("fixtures").join(model);
    Gemma3::load(
        &dir,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Greedy continuation with the KV cache: prefill once, then one token per step.
fn greedy_cached(m: &Gemma3, prompt: &[u32], steps: usize, block_size: usize) -> Vec<u32> {
    greedy_cached_with(m, prompt, None, steps, block_size)
}

/// As [`greedy_cached`], with image embeddings for the prompt's image rows.
fn greedy_cached_with(
    m: &Gemma3,
    prompt: &[u32],
    image_embeds: Option<&Tensor>,
    steps: usize,
    block_size: usize,
) -> Vec<u32> {
    let mut kv = m.new_kv_cache(KvCacheConfig {
        block_size,
        max_bytes: None,
        paged_blocks: None,
    });
    let mut s = kv.new_sequence();
    let mut out = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    let mut embeds = image_embeds;
    for _ in 0..steps {
        let lg = m
            .forward(
                &mut kv,
                &mut [SeqInput {
                    kv: &mut s,
                    tokens: &next,
                    image_embeds: embeds.take(),
                    logits: LogitsRows::Last,
                }],
            )
            .unwrap();
        let t = argmax(&lg[0].as_ref().unwrap().get(0).unwrap());
        out.push(t);
        next = vec![t];
    }
    kv.release(&mut s);
    out
}

fn check_case(m: &Gemma3, g: &Golden, name: &str) {
    let c = case(g, name);
    let prompt = ids(&c["prompt_ids"]);
    let (logits, hidden) = m.forward_with_hidden_states(&prompt, None).unwrap();
    let want = &g.tensors[&format!("{name}.logits")];
    let d = max_abs_diff(&logits, want);
    assert!(d <= TOL, "{name}: prompt logits differ by {d}");
    let n_layers = m.config().text.num_hidden_layers;
    assert_eq!(hidden.len(), n_layers + 1);
    for (i, h) in hidden.iter().enumerate() {
        let want = &g.tensors[&format!("{name}.hidden.{i}")];
        let d = max_abs_diff(h, want);
        assert!(d <= TOL, "{name}: hidden state {i} differs by {d}");
    }
    let steps = c["greedy_ids"].as_array().unwrap().len();
    for bs in [4, 16] {
        assert_eq!(
            greedy_cached(m, &prompt, steps, bs),
            ids(&c["greedy_ids"]),
            "{name}: greedy tokens (block size {bs})"
        );
    }
}

#[test]
fn tiny_27b_text_chat_prompt_with_system_and_traditional_chinese() {
    let (m, g) = (
        load("tiny-27b-text", ModelDType::F32),
        golden("tiny-27b-text"),
    );
    assert_ne!(
        m.config().text.query_pre_attn_scalar,
        m.config().text.head_dim as f64
    );
    check_case(&m, &g, "chat_system_zh");
}

#[test]
fn tiny_27b_text_prompt_spanning_several_sliding_windows() {
    let (m, g) = (
        load("tiny-27b-text", ModelDType::F32),
        golden("tiny-27b-text"),
    );
    let c = case(&g, "long_windows");
    assert!(ids(&c["prompt_ids"]).len() > 4 * m.config().text.sliding_window);
    check_case(&m, &g, "long_windows");
}

#[test]
fn chunked_prefill_equals_one_shot_prefill() {
    let (m, g) = (
        load("tiny-27b-text", ModelDType::F32),
        golden("tiny-27b-text"),
    );
    let prompt = ids(&case(&g, "long_windows")["prompt_ids"]);
    let want = &g.tensors["long_windows.logits"];
    for (chunk, bs) in [(5usize, 4usize), (1, 16), (13, 2)] {
        let mut kv = m.new_kv_cache(KvCacheConfig {
            block_size: bs,
            max_bytes: None,
            paged_blocks: None,
        });
        let mut s = kv.new_sequence();
        let mut rows = Vec::new();
        for part in prompt.chunks(chunk) {
            let lg = m
                .forward(
                    &mut kv,
                    &mut [SeqInput {
                        kv: &mut s,
                        tokens: part,
                        image_embeds: None,
                        logits: LogitsRows::All,
                    }],
                )
                .unwrap();
            rows.push(lg.into_iter().next().unwrap().unwrap());
        }
        let got = Tensor::cat(&rows, 0).unwrap();
        let d = max_abs_diff(&got, want);
        assert!(
            d <= TOL,
            "chunks of {chunk}, blocks of {bs}: logits differ by {d}"
        );
        // Sliding layers kept only their window, global layers everything.
        let (sliding, global) = kv.blocks_in_use();
        assert_eq!(global, prompt.len().div_ceil(bs));
        assert!(
            sliding * bs <= m.config().text.sliding_window + 2 * bs,
            "sliding blocks {sliding}"
        );
        kv.release(&mut s);
        assert_eq!(kv.bytes_in_use(), 0);
    }
}

#[test]
fn kv_cached_decode_equals_full_recompute() {
    let (m, g) = (
        load("tiny-27b-text", ModelDType::F32),
        golden("tiny-27b-text"),
    );
    let c = case(&g, "long_windows");
    let mut seq = ids(&c["prompt_ids"]);
    let mut kv = m.new_kv_cache(KvCacheConfig {
        block_size: 4,
        max_bytes: None,
        paged_blocks: None,
    });
    let mut s = kv.new_sequence();
    let mut next = seq.clone();
    for step in 0..6 {
        let cached = m
            .forward(
                &mut kv,
                &mut [SeqInput {
                    kv: &mut s,
                    tokens: &next,
                    image_embeds: None,
                    logits: LogitsRows::Last,
                }],
            )
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        let (full, _) = m.forward_with_hidden_states(&seq, None).unwrap();
        let last = full
            .get(full.dim(0).unwrap() - 1)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let d = max_abs_diff(&cached, &last);
        assert!(
            d <= TOL,
            "step {step}: cached decode differs from recompute by {d}"
        );
        let t = argmax(&cached.get(0).unwrap());
        seq.push(t);
        next = vec![t];
    }
}

#[test]
fn batch_of_two_prompts_of_different_lengths() {
    let (m, g) = (
        load("tiny-27b-text", ModelDType::F32),
        golden("tiny-27b-text"),
    );
    let (a, b) = (case(&g, "short_a"), case(&g, "short_b"));
    let (pa, pb) = (ids(&a["prompt_ids"]), ids(&b["prompt_ids"]));
    assert_ne!(pa.len(), pb.len());
    let mut kv = m.new_kv_cache(KvCacheConfig::default());
    let (mut sa, mut sb) = (kv.new_sequence(), kv.new_sequence());
    let out = m
        .forward(
            &mut kv,
            &mut [
                SeqInput {
                    kv: &mut sa,
                    tokens: &pa,
                    image_embeds: None,
                    logits: LogitsRows::All,
                },
                SeqInput {
                    kv: &mut sb,
                    tokens: &pb,
                    image_embeds: None,
                    logits: LogitsRows::All,
                },
            ],
        )
        .unwrap();
    for (name, got) in [("short_a", &out[0]), ("short_b", &out[1])] {
        let d = max_abs_diff(got.as_ref().unwrap(), &g.tensors[&format!("{name}.logits")]);
        assert!(d <= TOL, "{name} in a batch: logits differ by {d}");
    }
    // Decode both together, each at its own length, for the whole greedy continuation.
    let last = |t: &Option<Tensor>| {
        argmax(
            &t.as_ref()
                .unwrap()
                .get(t.as_ref().unwrap().dim(0).unwrap() - 1)
                .unwrap(),
        )
    };
    let (mut ga, mut gb) = (vec![last(&out[0])], vec![last(&out[1])]);
    let steps = a["greedy_ids"].as_array().unwrap().len();
    while ga.len() < steps {
        let (ta, tb) = ([*ga.last().unwrap()], [*gb.last().unwrap()]);
        let out = m
            .forward(
                &mut kv,
                &mut [
                    SeqInput {
                        kv: &mut sa,
                        tokens: &ta,
                        image_embeds: None,
                        logits: LogitsRows::Last,
                    },
                    SeqInput {
                        kv: &mut sb,
                        tokens: &tb,
                        image_embeds: None,
                        logits: LogitsRows::Last,
                    },
                ],
            )
            .unwrap();
        ga.push(last(&out[0]));
        gb.push(last(&out[1]));
    }
    assert_eq!(ga, ids(&a["greedy_ids"]));
    assert_eq!(gb, ids(&b["greedy_ids"]));
}

#[test]
fn bf16_matches_transformers_in_bf16() {
    let (m, g) = (
        load("tiny-27b-text", ModelDType::BF16),
        golden("tiny-27b-text"),
    );
    assert_eq!(m.dtype(), DType::BF16);
    for c in &g.cases {
        let name = c["name"].as_str().unwrap();
        let prompt = ids(&c["prompt_ids"]);
        let (logits, _) = m.forward_with_hidden_states(&prompt, None).unwrap();
        let want = &g.tensors[&format!("{name}.logits_bf16")];
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = max_abs_diff(&logits, want);
        // bf16 keeps 8 bits of mantissa: allow a few ulps at the logits' magnitude.
        assert!(
            d <= 0.04 * scale.max(1.0),
            "{name}: bf16 logits differ by {d} (scale {scale})"
        );
        let steps = c["greedy_ids_bf16"].as_array().unwrap().len();
        assert_eq!(
            greedy_cached(&m, &prompt, steps, 16),
            ids(&c["greedy_ids_bf16"]),
            "{name}: bf16 greedy"
        );
    }
}

#[test]
fn sharded_checkpoint_layout_is_detected() {
    let dir = repo_root().join("fixtures/tiny-27b-text");
    assert!(Path::new(&dir.join("model.safetensors.index.json")).exists());
    let ck = medgemma_model::SafetensorsCheckpoint::open(&dir).unwrap();
    assert_eq!(ck.layout(), &medgemma_model::HfLayout::TextOnly);
}

#[test]
fn tiny_4b_legacy_multimodal_checkpoint_serves_text() {
    let (m, g) = (load("tiny-4b", ModelDType::F32), golden("tiny-4b"));
    let dir = repo_root().join("fixtures/tiny-4b");
    let ck = medgemma_model::SafetensorsCheckpoint::open(&dir).unwrap();
    assert_eq!(ck.layout(), &medgemma_model::HfLayout::LegacyMultimodal);
    assert!(m.config().multimodal.is_some());
    check_case(&m, &g, "text_chat");
}

#[test]
fn tiny_4b_image_prompt_with_reference_image_features() {
    let (m, g) = (load("tiny-4b", ModelDType::F32), golden("tiny-4b"));
    let c = case(&g, "image_chat");
    let prompt = ids(&c["prompt_ids"]);
    let image_id = m.config().multimodal.as_ref().unwrap().image_token_index;
    let positions: Vec<usize> = prompt
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == image_id)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(serde_json::json!(positions), c["image_token_positions"]);
    let feats = &g.tensors["image_chat.image_features"];
    let (logits, hidden) = m.forward_with_hidden_states(&prompt, Some(feats)).unwrap();
    let d = max_abs_diff(&logits, &g.tensors["image_chat.logits"]);
    assert!(d <= TOL, "image prompt logits differ by {d}");
    for (i, h) in hidden.iter().enumerate() {
        let d = max_abs_diff(h, &g.tensors[&format!("image_chat.hidden.{i}")]);
        assert!(d <= TOL, "image prompt hidden state {i} differs by {d}");
    }
    // Greedy with the KV cache: prefill with the image, then plain decode.
    let want = ids(&c["greedy_ids"]);
    let got = greedy_cached_with(&m, &prompt, Some(feats), want.len(), 4);
    assert_eq!(got, want);
}

#[test]
fn transformers_v5_multimodal_layout_loads_the_same_model() {
    let src = repo_root().join("fixtures/tiny-4b");
    let tmp = tempfile::tempdir().unwrap();
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = if let Some(r) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if let Some(r) = k.strip_prefix("language_model.") {
                r.to_string()
            } else {
                format!("model.{k}")
            };
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let ck = medgemma_model::SafetensorsCheckpoint::open(tmp.path()).unwrap();
    assert_eq!(ck.layout(), &medgemma_model::HfLayout::Multimodal);
    let m = Gemma3::load(tmp.path(), &LoadOptions::default()).unwrap();
    let g = golden("tiny-4b");
    let prompt = ids(&case(&g, "text_chat")["prompt_ids"]);
    let (logits, _) = m.forward_with_hidden_states(&prompt, None).unwrap();
    let d = max_abs_diff(&logits, &g.tensors["text_chat.logits"]);
    assert!(d <= TOL, "v5 layout logits differ by {d}");
}
