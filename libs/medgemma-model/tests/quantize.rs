//! In-situ quantization of safetensors weights (Q8_0, Q4_K) and its GGUF cache.

mod common;

use candle_core::quantized::{GgmlDType, gguf_file};
use common::{Dims, max_abs_diff, write_random_model};
use medgemma_model::{Gemma3, KvCacheConfig, LoadOptions, LogitsRows, Quantize, SeqInput, Tensor};

fn logits(m: &Gemma3, tokens: &[u32]) -> Tensor {
    let mut kv = m.new_kv_cache(KvCacheConfig::default());
    let mut s = kv.new_sequence();
    let out = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s,
                tokens,
                image_embeds: None,
                logits: LogitsRows::All,
            }],
        )
        .unwrap();
    out.into_iter().next().unwrap().unwrap()
}

/// Relative error ||a - b|| / ||a||.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    let n = a
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    d / n
}

#[test]
fn quantized_logits_stay_close_and_the_cache_reloads_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_random_model(&model_dir, Dims::quantizable(), 7);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 512).collect();
    let f32_model = Gemma3::load(&model_dir, &LoadOptions::default()).unwrap();
    let reference = logits(&f32_model, &tokens);
    for (q, tol, linear, embed) in [
        (Quantize::Q8_0, 0.02, GgmlDType::Q8_0, GgmlDType::Q8_0),
        (Quantize::Q4K, 0.15, GgmlDType::Q4K, GgmlDType::Q6K),
    ] {
        let cache = tmp.path().join(format!("cache-{}", q.name()));
        let opts = LoadOptions {
            quantize: Some(q),
            cache_dir: Some(cache.clone()),
            ..Default::default()
        };
        let m = Gemma3::load(&model_dir, &opts).unwrap();
        assert!(!m.info().cache_hit);
        let cache_file = m.info().cache_file.clone().expect("cache written");
        let got = logits(&m, &tokens);
        let e = rel_err(&reference, &got);
        assert!(e < tol, "{q:?}: relative logit error {e} >= {tol}");
        assert!(
            e > 0.0,
            "{q:?}: quantization changed nothing, so it did not run"
        );
        // Every tensor in the cache has the intended type.
        let mut f = std::fs::File::open(&cache_file).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(content.tensor_infos.len(), 2 + 13 * 2);
        for (name, info) in &content.tensor_infos {
            let want = if name.ends_with("norm.weight") {
                GgmlDType::F32
            } else if name == "token_embd.weight" {
                embed
            } else {
                linear
            };
            assert_eq!(info.ggml_dtype, want, "{name}");
        }
        // The next start reads the cache and computes the same logits.
        let again = Gemma3::load(&model_dir, &opts).unwrap();
        assert!(again.info().cache_hit, "second load should hit the cache");
        assert_eq!(again.info().format, "gguf-cache");
        assert_eq!(max_abs_diff(&got, &logits(&again, &tokens)), 0.0);
    }
}

#[test]
fn unwritable_cache_dir_keeps_the_model_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_random_model(&model_dir, Dims::quantizable(), 3);
    // A regular file where the cache directory should be: nothing can be created under it.
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let opts = LoadOptions {
        quantize: Some(Quantize::Q8_0),
        cache_dir: Some(blocker.join("cache")),
        ..Default::default()
    };
    let m = Gemma3::load(&model_dir, &opts).unwrap();
    assert!(m.info().cache_file.is_none());
    assert_eq!(m.info().tensor_types.get("Q8_0").copied(), Some(1 + 7 * 2));
    let l = logits(&m, &[1, 2, 3]);
    assert_eq!(l.dims(), &[3, 512]);
}
