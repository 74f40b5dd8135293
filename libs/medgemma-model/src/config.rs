//! Gemma 3 configuration, read from Hugging Face `config.json` (both the old and the new key
//! sets, nested `text_config` or flat) or from GGUF metadata, with Hugging Face's defaults for
//! every key a checkpoint leaves out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Whether a decoder layer attends to a sliding window or to the whole sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Local attention: key k is visible to query q iff q - k < sliding_window.
    Sliding,
    /// Global attention over every earlier position.
    Global,
}

/// Rotary embedding parameters of one layer type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    /// Base frequency.
    pub theta: f64,
    /// Linear position-interpolation factor (inv_freq / factor); 1.0 means none.
    pub linear_factor: f64,
}

/// The text decoder's configuration (Gemma3TextConfig).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Attention scale is `query_pre_attn_scalar^-0.5` (168 for 27B, not head_dim).
    pub query_pre_attn_scalar: f64,
    pub rms_norm_eps: f64,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_global: RopeParams,
    pub rope_local: RopeParams,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// End-of-sequence ids from config.json and generation_config.json, merged.
    pub eos_token_ids: Vec<u32>,
}

/// The parts of a multimodal (Gemma3ForConditionalGeneration) config the decoder needs; the
/// vision tower's own config travels raw for the vision crate.
#[derive(Debug, Clone, PartialEq)]
pub struct MultimodalConfig {
    pub boi_token_index: u32,
    pub eoi_token_index: u32,
    pub image_token_index: u32,
    pub mm_tokens_per_image: usize,
    /// `vision_config` exactly as found in config.json.
    pub vision_config: Value,
}

/// A whole model's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    pub multimodal: Option<MultimodalConfig>,
}

impl TextConfig {
    /// Layer i's attention type.
    pub fn layer_type(&self, i: usize) -> LayerType {
        self.layer_types[i]
    }

    /// Attention softmax scale.
    pub fn attn_scale(&self) -> f64 {
        self.query_pre_attn_scalar.powf(-0.5)
    }

    /// The config in Hugging Face's new key set (what transformers 5 writes); parsing it back
    /// gives the same config. Used to embed the exact config in our quantization cache.
    pub fn to_hf_json(&self) -> Value {
        let rope = |r: &RopeParams| {
            if r.linear_factor == 1.0 {
                serde_json::json!({"rope_type": "default", "rope_theta": r.theta})
            } else {
                serde_json::json!({"rope_type": "linear", "factor": r.linear_factor, "rope_theta": r.theta})
            }
        };
        serde_json::json!({
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types.iter().map(|t| match t {
                LayerType::Sliding => "sliding_attention",
                LayerType::Global => "full_attention",
            }).collect::<Vec<_>>(),
            "rope_parameters": {
                "full_attention": rope(&self.rope_global),
                "sliding_attention": rope(&self.rope_local),
            },
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids,
        })
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(ModelError::config(path, m));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even", self.head_dim));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return bad(format!(
                "layer_types lists {} layers but num_hidden_layers is {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.sliding_window == 0 {
            return bad("sliding_window must be positive".into());
        }
        if self.query_pre_attn_scalar.is_nan() || self.query_pre_attn_scalar <= 0.0 {
            return bad("query_pre_attn_scalar must be positive".into());
        }
        Ok(())
    }
}

fn get_usize(v: &Value, key: &str, default: usize, path: &Path) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
            ModelError::config(path, format!("{key} must be a non-negative integer"))
        }),
    }
}

fn get_f64(v: &Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| ModelError::config(path, format!("{key} must be a number"))),
    }
}

fn get_opt_u32(v: &Value, key: &str) -> Option<u32> {
    v.get(key).and_then(Value::as_u64).map(|n| n as u32)
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses one rope parameter block (`rope_scaling` or an entry of `rope_parameters`).
fn rope_from(block: Option<&Value>, default_theta: f64, path: &Path) -> Result<RopeParams> {
    let Some(block) = block.filter(|b| !b.is_null()) else {
        return Ok(RopeParams {
            theta: default_theta,
            linear_factor: 1.0,
        });
    };
    let kind = block
        .get("rope_type")
        .or_else(|| block.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let theta = get_f64(block, "rope_theta", default_theta, path)?;
    let linear_factor = match kind {
        "default" => 1.0,
        "linear" => get_f64(block, "factor", 1.0, path)?,
        other => {
            return Err(ModelError::config(
                path,
                format!("rope type {other:?} is not supported (Gemma 3 uses default or linear)"),
            ));
        }
    };
    if linear_factor.is_nan() || linear_factor <= 0.0 || theta.is_nan() || theta <= 0.0 {
        return Err(ModelError::config(
            path,
            "rope theta and factor must be positive",
        ));
    }
    Ok(RopeParams {
        theta,
        linear_factor,
    })
}

/// Builds a [`TextConfig`] from a Gemma3TextConfig JSON object, applying HF defaults.
fn text_config_from_json(t: &Value, path: &Path) -> Result<TextConfig> {
    if t.get("use_bidirectional_attention")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Err(ModelError::config(
            path,
            "use_bidirectional_attention (an embedding model) is not a generative Gemma 3",
        ));
    }
    let num_hidden_layers = get_usize(t, "num_hidden_layers", 26, path)?;
    let layer_types = match t.get("layer_types") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x.as_str() {
                Some("sliding_attention") => Ok(LayerType::Sliding),
                Some("full_attention") => Ok(LayerType::Global),
                _ => Err(ModelError::config(path, format!("unknown layer type {x}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        _ => {
            let pattern = get_usize(t, "sliding_window_pattern", 6, path)?.max(1);
            (0..num_hidden_layers)
                .map(|i| {
                    if (i + 1) % pattern == 0 {
                        LayerType::Global
                    } else {
                        LayerType::Sliding
                    }
                })
                .collect()
        }
    };
    // New key set: rope_parameters {sliding_attention: {...}, full_attention: {...}}.
    // Old key set: rope_theta + rope_scaling (global only) + rope_local_base_freq.
    let (rope_global, rope_local) = match t.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(rp) if rp.get("full_attention").is_some() || rp.get("sliding_attention").is_some() => {
            (
                rope_from(rp.get("full_attention"), 1_000_000.0, path)?,
                rope_from(rp.get("sliding_attention"), 10_000.0, path)?,
            )
        }
        Some(rp) => {
            // A flat rope_parameters block applies to global layers.
            let g = rope_from(Some(rp), get_f64(t, "rope_theta", 1_000_000.0, path)?, path)?;
            let l = RopeParams {
                theta: get_f64(t, "rope_local_base_freq", 10_000.0, path)?,
                linear_factor: 1.0,
            };
            (g, l)
        }
        None => {
            let theta = get_f64(t, "rope_theta", 1_000_000.0, path)?;
            let g = rope_from(t.get("rope_scaling"), theta, path)?;
            let g = RopeParams { theta, ..g };
            let l = RopeParams {
                theta: get_f64(t, "rope_local_base_freq", 10_000.0, path)?,
                linear_factor: 1.0,
            };
            (g, l)
        }
    };
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if t.get(key).is_some_and(|v| !v.is_null()) {
            return Err(ModelError::config(
                path,
                format!("{key} is set; Gemma 3 has no softcapping (is this a Gemma 2 checkpoint?)"),
            ));
        }
    }
    let cfg = TextConfig {
        vocab_size: get_usize(t, "vocab_size", 262_208, path)?,
        hidden_size: get_usize(t, "hidden_size", 2304, path)?,
        intermediate_size: get_usize(t, "intermediate_size", 9216, path)?,
        num_hidden_layers,
        num_attention_heads: get_usize(t, "num_attention_heads", 8, path)?,
        num_key_value_heads: get_usize(t, "num_key_value_heads", 4, path)?,
        head_dim: get_usize(t, "head_dim", 256, path)?,
        query_pre_attn_scalar: get_f64(t, "query_pre_attn_scalar", 256.0, path)?,
        rms_norm_eps: get_f64(t, "rms_norm_eps", 1e-6, path)?,
        sliding_window: get_usize(t, "sliding_window", 4096, path)?,
        layer_types,
        rope_global,
        rope_local,
        max_position_embeddings: get_usize(t, "max_position_embeddings", 131_072, path)?,
        tie_word_embeddings: t
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        bos_token_id: get_opt_u32(t, "bos_token_id").or(Some(2)),
        pad_token_id: get_opt_u32(t, "pad_token_id").or(Some(0)),
        eos_token_ids: {
            let ids = ids_of(t.get("eos_token_id"));
            if ids.is_empty() { vec![1] } else { ids }
        },
    };
    cfg.validate(path)?;
    Ok(cfg)
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::config(path, format!("not valid JSON: {e}")))
}

impl ModelConfig {
    /// The configuration of whatever `--model` names: a Hugging Face checkpoint directory, or a
    /// `.gguf` file (only its header is read).
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::checkpoint(path, format!("not a readable GGUF file: {e}")))?;
        Self::from_gguf(&content.metadata, path)
    }

    /// Reads `config.json` (and `generation_config.json` beside it, for eos ids) from a
    /// Hugging Face checkpoint directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let root = read_json(&path)?;
        let mut cfg = Self::from_hf_json(&root, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let g = read_json(&gen_path)?;
            for id in ids_of(g.get("eos_token_id")) {
                if !cfg.text.eos_token_ids.contains(&id) {
                    cfg.text.eos_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    /// Parses a config.json value; `path` is only used in error messages.
    pub fn from_hf_json(root: &Value, path: &Path) -> Result<Self> {
        let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = root
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let is_gemma3 = matches!(model_type, "gemma3" | "gemma3_text")
            || archs.iter().any(|a| a.starts_with("Gemma3"));
        if !is_gemma3 {
            let found = if model_type.is_empty() {
                archs.join(",")
            } else {
                model_type.to_string()
            };
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found,
            });
        }
        match root.get("text_config") {
            Some(t) if t.is_object() => {
                let mut text = text_config_from_json(t, path)?;
                // Top-level eos ids (if any) apply to the whole model.
                for id in ids_of(root.get("eos_token_id")) {
                    if !text.eos_token_ids.contains(&id) {
                        text.eos_token_ids.push(id);
                    }
                }
                let multimodal = match root.get("vision_config") {
                    Some(v) if v.is_object() => Some(MultimodalConfig {
                        boi_token_index: get_opt_u32(root, "boi_token_index").unwrap_or(255_999),
                        eoi_token_index: get_opt_u32(root, "eoi_token_index").unwrap_or(256_000),
                        image_token_index: get_opt_u32(root, "image_token_index")
                            .unwrap_or(262_144),
                        mm_tokens_per_image: get_usize(root, "mm_tokens_per_image", 256, path)?,
                        vision_config: v.clone(),
                    }),
                    _ => None,
                };
                Ok(Self { text, multimodal })
            }
            _ => Ok(Self {
                text: text_config_from_json(root, path)?,
                multimodal: None,
            }),
        }
    }

    /// Reads the configuration from GGUF metadata (`general.architecture = gemma3`).
    pub fn from_gguf(md: &HashMap<String, gguf_file::Value>, path: &Path) -> Result<Self> {
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "gemma3" {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: arch,
            });
        }
        // Our own quantization cache embeds the exact HF config.
        if let Some(json) = md
            .get("medgemma.text_config")
            .and_then(|v| v.to_string().ok())
        {
            let v: Value = serde_json::from_str(json).map_err(|e| {
                ModelError::config(path, format!("medgemma.text_config is not valid JSON: {e}"))
            })?;
            return Ok(Self {
                text: text_config_from_json(&v, path)?,
                multimodal: None,
            });
        }
        let req_u = |k: &str| -> Result<usize> {
            let key = format!("gemma3.{k}");
            md.get(&key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|n| n as usize)
                .ok_or_else(|| ModelError::config(path, format!("GGUF metadata lacks {key}")))
        };
        let opt_f = |k: &str| -> Option<f64> {
            md.get(&format!("gemma3.{k}"))
                .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
        };
        let hidden_size = req_u("embedding_length")?;
        let num_hidden_layers = req_u("block_count")?;
        let num_attention_heads = req_u("attention.head_count")?;
        let num_key_value_heads = req_u("attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim = req_u("attention.key_length").unwrap_or(256);
        // GGUF stores no query_pre_attn_scalar; llama.cpp derives it the same way: the 62-layer
        // 27B uses hidden / heads (168), every other size uses head_dim.
        let query_pre_attn_scalar =
            opt_f("attention.query_pre_attn_scalar").unwrap_or(if num_hidden_layers == 62 {
                (hidden_size / num_attention_heads) as f64
            } else {
                head_dim as f64
            });
        let linear_factor = match md
            .get("gemma3.rope.scaling.type")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => 1.0,
            Some("linear") => opt_f("rope.scaling.factor").unwrap_or(1.0),
            Some(other) => {
                return Err(ModelError::config(
                    path,
                    format!("rope scaling type {other:?} is not supported"),
                ));
            }
        };
        let pattern = 6;
        let gguf_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let mut eos = vec![gguf_u32("tokenizer.ggml.eos_token_id").unwrap_or(1)];
        if let Some(eot) = gguf_u32("tokenizer.ggml.eot_token_id")
            && !eos.contains(&eot)
        {
            eos.push(eot);
        }
        let vocab_size = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(Vec::len)
            .unwrap_or(262_144);
        let text = TextConfig {
            vocab_size,
            hidden_size,
            intermediate_size: req_u("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            query_pre_attn_scalar,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            sliding_window: req_u("attention.sliding_window").unwrap_or(4096),
            layer_types: (0..num_hidden_layers)
                .map(|i| {
                    if (i + 1) % pattern == 0 {
                        LayerType::Global
                    } else {
                        LayerType::Sliding
                    }
                })
                .collect(),
            rope_global: RopeParams {
                theta: opt_f("rope.freq_base").unwrap_or(1_000_000.0),
                linear_factor,
            },
            rope_local: RopeParams {
                theta: 10_000.0,
                linear_factor: 1.0,
            },
            max_position_embeddings: req_u("context_length").unwrap_or(131_072),
            tie_word_embeddings: true,
            bos_token_id: gguf_u32("tokenizer.ggml.bos_token_id").or(Some(2)),
            pad_token_id: gguf_u32("tokenizer.ggml.padding_token_id").or(Some(0)),
            eos_token_ids: eos,
        };
        text.validate(path)?;
        Ok(Self {
            text,
            multimodal: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p() -> &'static Path {
        Path::new("config.json")
    }

    #[test]
    fn old_key_set_nested_like_medgemma_4b() {
        let v = json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
            "mm_tokens_per_image": 256,
            "text_config": {
                "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024
            },
            "vision_config": {"hidden_size": 1152, "image_size": 896}
        });
        let c = ModelConfig::from_hf_json(&v, p()).unwrap();
        let t = &c.text;
        assert_eq!(t.num_attention_heads, 8);
        assert_eq!(t.num_key_value_heads, 4);
        assert_eq!(t.head_dim, 256);
        assert_eq!(t.query_pre_attn_scalar, 256.0);
        assert_eq!(t.vocab_size, 262_208);
        assert_eq!(t.rope_global.linear_factor, 8.0);
        assert_eq!(t.rope_global.theta, 1_000_000.0);
        assert_eq!(t.rope_local.theta, 10_000.0);
        assert_eq!(t.rope_local.linear_factor, 1.0);
        assert_eq!(t.layer_type(5), LayerType::Global);
        assert_eq!(t.layer_type(4), LayerType::Sliding);
        assert_eq!(t.layer_type(33), LayerType::Sliding);
        assert_eq!(t.eos_token_ids, vec![1]);
        let mm = c.multimodal.unwrap();
        assert_eq!(mm.image_token_index, 262_144);
    }

    #[test]
    fn new_key_set_flat_like_27b_text() {
        let v = json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_size": 5376, "num_hidden_layers": 4, "num_attention_heads": 32,
            "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
            },
            "eos_token_id": [1, 106]
        });
        let c = ModelConfig::from_hf_json(&v, p()).unwrap();
        assert!(c.multimodal.is_none());
        assert_eq!(c.text.layer_type(1), LayerType::Global);
        assert_eq!(c.text.rope_global.linear_factor, 8.0);
        assert!((c.text.attn_scale() - 168f64.powf(-0.5)).abs() < 1e-12);
        assert_eq!(c.text.eos_token_ids, vec![1, 106]);
    }

    #[test]
    fn hf_json_round_trips() {
        let v = json!({"model_type": "gemma3_text", "num_hidden_layers": 7,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "eos_token_id": [1, 106]});
        let c = ModelConfig::from_hf_json(&v, p()).unwrap();
        let back = ModelConfig::from_hf_json(&c.text.to_hf_json(), p()).unwrap();
        assert_eq!(c.text, back.text);
    }

    #[test]
    fn rejects_other_architectures_and_softcapping() {
        let v = json!({"model_type": "llama"});
        assert!(matches!(
            ModelConfig::from_hf_json(&v, p()),
            Err(ModelError::UnsupportedArchitecture { .. })
        ));
        let v = json!({"model_type": "gemma3_text", "final_logit_softcapping": 30.0});
        let e = ModelConfig::from_hf_json(&v, p()).unwrap_err().to_string();
        assert!(e.contains("softcapping"), "{e}");
        let v = json!({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}});
        assert!(ModelConfig::from_hf_json(&v, p()).is_err());
    }
}
