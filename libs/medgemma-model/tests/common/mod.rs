//! Test helpers: random Gemma 3 checkpoints written in the Hugging Face layout.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

/// Shape of a random test model.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: usize,
}

impl Dims {
    /// Every dimension a multiple of 256, so Q4_K applies to every matrix.
    pub fn quantizable() -> Self {
        Self {
            vocab: 512,
            hidden: 256,
            inter: 512,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 256,
            window: 8,
        }
    }
}

#[allow(unused_imports)] // each test binary uses some of them
pub use medgemma_test_support::{Golden, golden, ids, max_abs_diff, repo_root};

/// Writes `config.json` + `model.safetensors` (text-only `model.*` layout) with seeded
/// random weights, returning the tensors written.
pub fn write_random_model(dir: &Path, d: Dims, seed: u64) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut randn = |shape: &[usize], std: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                // xorshift -> uniform(-1, 1) * std * sqrt(3): variance std^2.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let u = (rng >> 11) as f32 / (1u64 << 53) as f32;
                (2.0 * u - 1.0) * std * 3f32.sqrt()
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&[d.vocab, d.hidden], 0.5),
    );
    t.insert("model.norm.weight".to_string(), randn(&[d.hidden], 0.2));
    let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    for i in 0..d.layers {
        let p = format!("model.layers.{i}.");
        let mut put = |name: &str, x: Tensor| {
            t.insert(format!("{p}{name}.weight"), x);
        };
        put("input_layernorm", randn(&[d.hidden], 0.2));
        put("post_attention_layernorm", randn(&[d.hidden], 0.2));
        put("pre_feedforward_layernorm", randn(&[d.hidden], 0.2));
        put("post_feedforward_layernorm", randn(&[d.hidden], 0.2));
        put("self_attn.q_norm", randn(&[d.head_dim], 0.2));
        put("self_attn.k_norm", randn(&[d.head_dim], 0.2));
        put(
            "self_attn.q_proj",
            randn(&[d.heads * d.head_dim, d.hidden], s(d.hidden)),
        );
        put(
            "self_attn.k_proj",
            randn(&[d.kv_heads * d.head_dim, d.hidden], s(d.hidden)),
        );
        put(
            "self_attn.v_proj",
            randn(&[d.kv_heads * d.head_dim, d.hidden], s(d.hidden)),
        );
        put(
            "self_attn.o_proj",
            randn(&[d.hidden, d.heads * d.head_dim], s(d.heads * d.head_dim)),
        );
        put("mlp.gate_proj", randn(&[d.inter, d.hidden], s(d.hidden)));
        put("mlp.up_proj", randn(&[d.inter, d.hidden], s(d.hidden)));
        put("mlp.down_proj", randn(&[d.hidden, d.inter], s(d.inter)));
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let cfg = json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": d.vocab, "hidden_size": d.hidden, "intermediate_size": d.inter,
        "num_hidden_layers": d.layers, "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads, "head_dim": d.head_dim,
        "query_pre_attn_scalar": d.head_dim, "sliding_window": d.window,
        "sliding_window_pattern": 2, "max_position_embeddings": 64,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "torch_dtype": "float32"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    t
}

/// Index of the largest value of a 1-D tensor.
pub fn argmax(row: &Tensor) -> u32 {
    let v: Vec<f32> = row.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    v.iter()
        .enumerate()
        .fold(
            (0usize, f32::MIN),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0 as u32
}

pub fn case<'a>(g: &'a Golden, name: &str) -> &'a Value {
    g.case(name)
}
