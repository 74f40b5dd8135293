//! Bad checkpoints and bad requests give clear errors naming the file, tensor or limit.

mod common;

use common::{Dims, write_random_model};
use medgemma_model::{Gemma3, KvCacheConfig, LoadOptions, LogitsRows, ModelDType, SeqInput};

fn small() -> Dims {
    Dims {
        vocab: 64,
        hidden: 32,
        inter: 64,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
        window: 4,
    }
}

fn err(path: &std::path::Path, opts: &LoadOptions) -> String {
    match Gemma3::load(path, opts) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_truncated_and_corrupt_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = LoadOptions::default();
    let e = err(&tmp.path().join("nope"), &opts);
    assert!(e.contains("no such file"), "{e}");

    let dir = tmp.path().join("m");
    write_random_model(&dir, small(), 1);
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&dir, &opts);
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(&st, b"this is not a safetensors file").unwrap();
    let e = err(&dir, &opts);
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::remove_file(&st).unwrap();
    let e = err(&dir, &opts);
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_and_missing_tensor_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut t = write_random_model(&dir, small(), 1);
    let name = "model.layers.1.mlp.up_proj.weight";
    t.insert(
        name.into(),
        candle_core::Tensor::zeros((3, 5), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = err(&dir, &LoadOptions::default());
    assert!(
        e.contains(name) && e.contains("[3, 5]") && e.contains("[64, 32]"),
        "{e}"
    );

    t.remove(name);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = err(&dir, &LoadOptions::default());
    assert!(e.contains("missing") && e.contains(name), "{e}");
}

#[test]
fn unsupported_architecture_and_f16_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_random_model(&dir, small(), 1);
    let e = err(
        &dir,
        &LoadOptions {
            dtype: ModelDType::F16,
            ..Default::default()
        },
    );
    assert!(e.contains("f16") && e.contains("bf16"), "{e}");

    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let e = err(&dir, &LoadOptions::default());
    assert!(
        e.contains("unsupported architecture") && e.contains("llama"),
        "{e}"
    );

    std::fs::write(dir.join("config.json"), b"{not json").unwrap();
    let e = err(&dir, &LoadOptions::default());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn truncated_gguf_and_unknown_tensor_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_random_model(&dir, Dims::quantizable(), 2);
    let cache = tmp.path().join("cache");
    let m = Gemma3::load(
        &dir,
        &LoadOptions {
            quantize: Some(medgemma_model::Quantize::Q8_0),
            cache_dir: Some(cache),
            ..Default::default()
        },
    )
    .unwrap();
    let gguf = m.info().cache_file.clone().unwrap();
    let bytes = std::fs::read(&gguf).unwrap();

    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err(&cut, &LoadOptions::default());
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");

    // Patch the first tensor's GGML type id (u32 after name, n_dims, dims) to an unknown 99.
    let mut patched = bytes.clone();
    let mut f = std::io::Cursor::new(&bytes);
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let (name, info) = content.tensor_infos.iter().next().unwrap();
    let needle = name.as_bytes();
    let pos = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len();
    let type_pos = pos + 4 + 8 * info.shape.rank();
    patched[type_pos..type_pos + 4].copy_from_slice(&99u32.to_le_bytes());
    let bad = tmp.path().join("badtype.gguf");
    std::fs::write(&bad, &patched).unwrap();
    let e = err(&bad, &LoadOptions::default());
    assert!(e.contains("badtype.gguf"), "{e}");
}

#[test]
fn prompt_longer_than_the_context_and_bad_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_random_model(&dir, small(), 1);
    let m = Gemma3::load(&dir, &LoadOptions::default()).unwrap();
    let mut kv = m.new_kv_cache(KvCacheConfig::default());
    let mut s = kv.new_sequence();
    let long = vec![5u32; 65];
    let e = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s,
                tokens: &long,
                image_embeds: None,
                logits: LogitsRows::Last,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("65") && e.contains("context of 64"), "{e}");
    let e = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s,
                tokens: &[1, 64],
                image_embeds: None,
                logits: LogitsRows::Last,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("token id 64"), "{e}");
    // Nothing was cached by the failed calls.
    assert_eq!(s.len(), 0);
}
