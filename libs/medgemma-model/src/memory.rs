//! GPU memory planning, as vLLM's `--gpu-memory-utilization` does it: of the device's memory,
//! the fraction `utilization` may be used by this process; the weights (measured after load)
//! and a reserve for activations come off it, and what is left holds the paged KV cache. The
//! plan derives the longest context and how many sequences fit at once, and is printed at
//! start-up. Everything here is arithmetic, unit-tested on the CPU.
//!
//! The weight sizes of a configuration ([`weight_bytes`]) are computed from the exact tensor
//! shapes of the checkpoint and the storage type of each tensor (bf16, f32 norms, or the GGML
//! block formats `--quantize` writes), so the README's 27B figures need no GPU to reproduce.

use candle_core::quantized::GgmlDType;

use crate::config::{LayerType, TextConfig};
use crate::error::{ModelError, Result};
use crate::weights::Quantize;

const GIB: f64 = (1u64 << 30) as f64;

/// How the decoder's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    BF16,
    /// `--quantize q8_0|q4k`: matrices and embedding in GGML blocks, norms in f32.
    Quantized(Quantize),
}

impl WeightFormat {
    /// Bytes of an `[rows, cols]` matrix (`embedding`: the token embedding, also the tied
    /// output head).
    fn matrix_bytes(self, rows: usize, cols: usize, embedding: bool) -> usize {
        match self {
            Self::F32 => rows * cols * 4,
            Self::BF16 => rows * cols * 2,
            Self::Quantized(q) => {
                let intended = if embedding {
                    q.embedding_dtype()
                } else {
                    q.linear_dtype()
                };
                let t = Quantize::effective(intended, cols);
                if t == GgmlDType::F32 {
                    rows * cols * 4
                } else {
                    rows * (cols / t.block_size()) * t.type_size()
                }
            }
        }
    }

    /// The name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::BF16 => "bf16",
            Self::Quantized(q) => q.name(),
        }
    }
}

/// The decoder's weight bytes by part (norms are held in f32 in every format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightBytes {
    /// The token embedding (and the output head when tied).
    pub embedding: usize,
    /// The attention and MLP matrices of every layer.
    pub matrices: usize,
    /// The RMSNorm weights.
    pub norms: usize,
    /// An untied output head.
    pub lm_head: usize,
}

impl WeightBytes {
    pub fn total(&self) -> usize {
        self.embedding + self.matrices + self.norms + self.lm_head
    }
}

/// The bytes the decoder's weights take in `format`, from its tensor shapes.
pub fn weight_bytes(t: &TextConfig, format: WeightFormat) -> WeightBytes {
    let (h, hd, ff) = (t.hidden_size, t.head_dim, t.intermediate_size);
    let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
    let per_layer = format.matrix_bytes(q, h, false)
        + 2 * format.matrix_bytes(kv, h, false)
        + format.matrix_bytes(h, q, false)
        + 2 * format.matrix_bytes(ff, h, false)
        + format.matrix_bytes(h, ff, false);
    // input, post-attention, pre- and post-feedforward norms (hidden), q and k norms (head_dim).
    let norms = t.num_hidden_layers * (4 * h + 2 * hd) * 4 + h * 4;
    WeightBytes {
        embedding: format.matrix_bytes(t.vocab_size, h, true),
        matrices: t.num_hidden_layers * per_layer,
        norms,
        lm_head: if t.tie_word_embeddings {
            0
        } else {
            format.matrix_bytes(t.vocab_size, h, false)
        },
    }
}

/// Bytes of one KV-cache block of `block_size` positions for every layer of one kind (k and
/// v): the unit the paged pools are counted in.
pub fn kv_block_bytes(t: &TextConfig, kind: LayerType, block_size: usize, elem: usize) -> usize {
    let layers = t.layer_types.iter().filter(|&&k| k == kind).count();
    2 * layers * t.num_key_value_heads * t.head_dim * block_size * elem
}

/// The activations one forward step of `rows` packed rows may hold at its peak, an upper
/// estimate in f32 (the largest intermediate tensors of one layer alive together, the
/// logits of up to `logit_rows` rows, and the runtime's own workspaces).
pub fn activation_bytes(t: &TextConfig, rows: usize, logit_rows: usize) -> usize {
    let (h, ff, hd) = (t.hidden_size, t.intermediate_size, t.head_dim);
    let qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * hd;
    let per_row = 6 * h + 3 * ff + 2 * qkv;
    rows * per_row * 4 + 2 * logit_rows * t.vocab_size * 4 + RUNTIME_RESERVE_BYTES
}

/// cuBLAS / cuBLASLt workspaces, the quantized kernels' scratch, the NVRTC module and what
/// the stream-ordered allocator keeps: held back from the KV cache.
pub const RUNTIME_RESERVE_BYTES: usize = 512 << 20;

/// What a plan starts from.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The device's memory.
    pub total_bytes: usize,
    /// In use after the weights were loaded (by this process and any other): total - free.
    pub used_bytes: usize,
    /// The weights as loaded (measured), for the report.
    pub weight_bytes: usize,
    /// The fraction of the device this process may use, in (0, 1].
    pub utilization: f64,
    /// Peak activations of one step ([`activation_bytes`]).
    pub activation_bytes: usize,
    /// Block bytes of the sliding and of the global layers ([`kv_block_bytes`]).
    pub block_bytes: [usize; 2],
    pub block_size: usize,
    pub sliding_window: usize,
    /// The model's context length.
    pub max_model_len: usize,
    /// Sequences that run at once (`--max-running`).
    pub max_running: usize,
    /// Rows of one step (`--max-batch-tokens`): the largest prefill chunk.
    pub max_batch_tokens: usize,
}

/// The KV cache a device can hold and what it allows.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub total_bytes: usize,
    pub weight_bytes: usize,
    pub activation_bytes: usize,
    /// Bytes given to the KV cache (the sum of both pools).
    pub kv_bytes: usize,
    /// Blocks of the sliding-layer pool and of the global-layer pool.
    pub blocks: [usize; 2],
    pub block_size: usize,
    /// The longest sequence one request may reach.
    pub max_context: usize,
    /// Sequences that fit at once at `max_context`.
    pub max_batch_at_max_context: usize,
    /// Sequences that fit at once at 4,096 positions.
    pub max_batch_at_4k: usize,
    /// Tokens the global layers can hold over all sequences.
    pub token_capacity: usize,
}

/// The KV bytes the planning leaves, before they are split into pools.
pub fn kv_budget(p: &PlanInput) -> Result<usize> {
    if !(p.utilization > 0.0 && p.utilization <= 1.0) {
        return Err(ModelError::Limit(format!(
            "--gpu-memory-utilization {} must be in (0, 1]",
            p.utilization
        )));
    }
    let budget = (p.total_bytes as f64 * p.utilization) as usize;
    let left = budget
        .checked_sub(p.used_bytes)
        .and_then(|b| b.checked_sub(p.activation_bytes))
        .filter(|&b| b >= p.block_bytes[0] + p.block_bytes[1]);
    left.ok_or_else(|| {
        ModelError::Limit(format!(
            "no room for a KV cache: {:.2} GiB of {:.2} GiB may be used (--gpu-memory-utilization \
             {}), {:.2} GiB are in use after loading {:.2} GiB of weights and {:.2} GiB are kept \
             for activations; raise --gpu-memory-utilization, lower --max-batch-tokens, or \
             quantize (--quantize q4k)",
            budget as f64 / GIB,
            p.total_bytes as f64 / GIB,
            p.utilization,
            p.used_bytes as f64 / GIB,
            p.weight_bytes as f64 / GIB,
            p.activation_bytes as f64 / GIB,
        ))
    })
}

/// The context the pools are balanced for: a sequence of this length needs its share of both.
pub const BALANCE_CONTEXT: usize = 8192;

/// Sliding-layer blocks one sequence of `len` positions holds at most: its window plus one
/// prefill chunk, plus a partial block.
fn sliding_blocks_per_seq(p: &PlanInput, len: usize) -> usize {
    (p.sliding_window + p.max_batch_tokens)
        .min(len)
        .div_ceil(p.block_size.max(1))
        + 1
}

/// Splits `kv_bytes` between the sliding-layer pool and the global-layer pool in the ratio a
/// sequence of [`BALANCE_CONTEXT`] positions (or the model's context, if shorter) needs, the
/// sliding pool never beyond what every running sequence can hold at once; the global pool
/// takes the rest. A model without sliding (or without global) layers gives everything to the
/// other pool.
pub fn split_blocks(kv_bytes: usize, p: &PlanInput) -> [usize; 2] {
    let [bs_s, bs_g] = p.block_bytes;
    let bs = p.block_size.max(1);
    if bs_s == 0 {
        return [0, kv_bytes / bs_g.max(1)];
    }
    if bs_g == 0 {
        return [kv_bytes / bs_s, 0];
    }
    let len = p.max_model_len.min(BALANCE_CONTEXT);
    let s_need = (sliding_blocks_per_seq(p, len) * bs_s) as u128;
    let g_need = (len.div_ceil(bs) * bs_g) as u128;
    let s_bytes = (kv_bytes as u128 * s_need / (s_need + g_need)) as usize;
    let cap = p.max_running.max(1) * sliding_blocks_per_seq(p, p.max_model_len);
    let sliding = (s_bytes / bs_s).min(cap);
    let global = (kv_bytes - sliding * bs_s) / bs_g;
    [sliding, global]
}

/// The plan: budget, pools, and what they allow.
pub fn plan(p: &PlanInput) -> Result<MemoryPlan> {
    let kv_bytes = kv_budget(p)?;
    let blocks = split_blocks(kv_bytes, p);
    let bs = p.block_size.max(1);
    let sliding_per_seq = |len: usize| sliding_blocks_per_seq(p, len);
    let fits = |len: usize| -> usize {
        let g = if p.block_bytes[1] == 0 {
            usize::MAX
        } else {
            blocks[1] / len.div_ceil(bs)
        };
        let s = if p.block_bytes[0] == 0 {
            usize::MAX
        } else {
            blocks[0] / sliding_per_seq(len)
        };
        g.min(s).min(p.max_running)
    };
    let token_capacity = if p.block_bytes[1] == 0 {
        blocks[0] * bs
    } else {
        blocks[1] * bs
    };
    let max_context = p.max_model_len.min(token_capacity);
    Ok(MemoryPlan {
        total_bytes: p.total_bytes,
        weight_bytes: p.weight_bytes,
        activation_bytes: p.activation_bytes,
        kv_bytes: blocks[0] * p.block_bytes[0] + blocks[1] * p.block_bytes[1],
        blocks,
        block_size: bs,
        max_context,
        max_batch_at_max_context: fits(max_context.max(1)),
        max_batch_at_4k: fits(4096.min(max_context).max(1)),
        token_capacity,
    })
}

impl PlanInput {
    /// The input for a model config on a device of `total_bytes` with `used_bytes` in use
    /// after loading `weight_bytes` of weights, KV in `kv_elem`-byte elements.
    #[allow(clippy::too_many_arguments)]
    pub fn for_model(
        t: &TextConfig,
        total_bytes: usize,
        used_bytes: usize,
        weight_bytes: usize,
        utilization: f64,
        kv_elem: usize,
        block_size: usize,
        max_running: usize,
        max_batch_tokens: usize,
    ) -> Self {
        Self {
            total_bytes,
            used_bytes,
            weight_bytes,
            utilization,
            activation_bytes: activation_bytes(t, max_batch_tokens, max_running),
            block_bytes: [
                kv_block_bytes(t, LayerType::Sliding, block_size, kv_elem),
                kv_block_bytes(t, LayerType::Global, block_size, kv_elem),
            ],
            block_size,
            sliding_window: t.sliding_window,
            max_model_len: t.max_position_embeddings,
            max_running,
            max_batch_tokens,
        }
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {:.2} GiB: weights {:.2} GiB, activations reserve {:.2} GiB, KV cache {:.2} \
             GiB ({} sliding + {} global blocks of {} positions, {} tokens); max context {} \
             tokens, max batch {} at that context, {} at 4096 tokens",
            self.total_bytes as f64 / GIB,
            self.weight_bytes as f64 / GIB,
            self.activation_bytes as f64 / GIB,
            self.kv_bytes as f64 / GIB,
            self.blocks[0],
            self.blocks[1],
            self.block_size,
            self.token_capacity,
            self.max_context,
            self.max_batch_at_max_context,
            self.max_batch_at_4k,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn config(name: &str) -> TextConfig {
        let path = medgemma_test_support::fixture("configs").join(name);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        ModelConfig::from_hf_json(&v, &path).unwrap().text
    }

    #[test]
    fn weight_bytes_of_the_27b_from_its_shapes() {
        let t = config("medgemma-27b-text-it.json");
        let bf16 = weight_bytes(&t, WeightFormat::BF16);
        // 62 layers x (q 4096x5376 + k, v 2048x5376 + o 5376x4096 + 3 x 21504x5376) in bf16.
        let per_layer = (4096 * 5376 * 2 + 2 * 2048 * 5376 + 3 * 21504 * 5376) * 2;
        assert_eq!(bf16.matrices, 62 * per_layer);
        assert_eq!(bf16.embedding, t.vocab_size * 5376 * 2);
        assert_eq!(bf16.lm_head, 0, "tied output head");
        let q4 = weight_bytes(&t, WeightFormat::Quantized(Quantize::Q4K));
        // Q4_K: 144 bytes per 256 weights; Q6_K embedding: 210 bytes per 256.
        assert_eq!(q4.matrices, bf16.matrices / 2 * 144 / 256);
        assert_eq!(q4.embedding, t.vocab_size * 5376 / 256 * 210);
        assert_eq!(q4.norms, bf16.norms);
        let gb = |b: usize| b as f64 / 1e9;
        assert!(
            (53.0..56.0).contains(&gb(bf16.total())),
            "{}",
            gb(bf16.total())
        );
        assert!((15.0..17.0).contains(&gb(q4.total())), "{}", gb(q4.total()));
    }

    fn input(t: &TextConfig, total_gib: f64, weights: usize, util: f64) -> PlanInput {
        let total = (total_gib * GIB) as usize;
        PlanInput::for_model(
            t,
            total,
            weights + (300 << 20),
            weights,
            util,
            2,
            16,
            64,
            512,
        )
    }

    /// The README's figures (printed with `--nocapture`): a 27B in bf16 on one 80 GB device,
    /// in 4-bit on one 24 GB device, each with 300 MiB of CUDA context besides the weights.
    #[test]
    fn the_27b_in_bf16_on_80gb_and_in_4bit_on_24gb() {
        let t = config("medgemma-27b-text-it.json");
        let bf16 = weight_bytes(&t, WeightFormat::BF16).total();
        let p = plan(&input(&t, 80.0, bf16, 0.9)).unwrap();
        println!("27B bf16, 80 GB: {p}");
        assert!(p.kv_bytes > 18 << 30, "{p}");
        assert_eq!(p.max_context, 131_072, "{p}");
        assert!((16..=32).contains(&p.max_batch_at_4k), "{p}");
        let q4 = weight_bytes(&t, WeightFormat::Quantized(Quantize::Q4K)).total();
        let p = plan(&input(&t, 24.0, q4, 0.9)).unwrap();
        println!("27B q4k, 24 GB: {p}");
        assert!(p.kv_bytes > 4 << 30, "{p}");
        assert!(p.max_context >= 32 * 1024, "{p}");
        assert!(p.max_batch_at_4k >= 4, "{p}");
        // bf16 on one 24 GB device does not fit: a clear error naming the flag.
        let e = plan(&input(&t, 24.0, bf16, 0.9)).unwrap_err().to_string();
        assert!(
            e.contains("--gpu-memory-utilization") && e.contains("q4k"),
            "{e}"
        );
    }

    #[test]
    fn budget_arithmetic_is_exact() {
        let t = config("medgemma-4b-it.json");
        let mut p = input(&t, 80.0, 8 << 30, 0.5);
        p.used_bytes = 10 << 30;
        p.activation_bytes = 2 << 30;
        assert_eq!(kv_budget(&p).unwrap(), (40usize << 30) - (12 << 30));
        let pl = plan(&p).unwrap();
        assert!(pl.kv_bytes <= 28 << 30);
        assert!(pl.kv_bytes + p.block_bytes[0] + p.block_bytes[1] > 28 << 30);
        // The pools in the ratio a sequence of 8,192 positions needs: sliding layers hold
        // the window + a chunk + a block, global layers all 8,192.
        let per_seq = (t.sliding_window + 512).div_ceil(16) + 1;
        let (s_need, g_need) = (per_seq * p.block_bytes[0], 512 * p.block_bytes[1]);
        let want = (28usize << 30) as f64 * s_need as f64 / (s_need + g_need) as f64;
        // 64 running sequences cap the sliding pool below that share ...
        assert_eq!(pl.blocks[0], 64 * per_seq, "{pl}");
        assert!(((64 * per_seq * p.block_bytes[0]) as f64) < want);
        // ... 10,000 do not.
        p.max_running = 10_000;
        let s_bytes = split_blocks(28 << 30, &p)[0] * p.block_bytes[0];
        assert!(
            (s_bytes as f64 - want).abs() <= p.block_bytes[0] as f64,
            "{s_bytes} {want}"
        );
        // Never more sliding blocks than every running sequence can hold.
        p.max_running = 2;
        assert_eq!(split_blocks(28 << 30, &p)[0], 2 * per_seq);
        p.max_running = 64;
        assert_eq!(pl.token_capacity, pl.blocks[1] * 16);
        assert_eq!(
            pl.max_context,
            t.max_position_embeddings.min(pl.token_capacity)
        );
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            p.utilization = bad;
            assert!(kv_budget(&p).is_err(), "{bad}");
        }
    }

    #[test]
    fn kv_block_bytes_count_each_layer_kind() {
        let t = config("medgemma-4b-it.json");
        // 34 layers: every 6th global (5, 11, 17, 23, 29), 29 sliding; 4 kv heads x 256.
        assert_eq!(
            kv_block_bytes(&t, LayerType::Global, 16, 2),
            2 * 5 * 4 * 256 * 16 * 2
        );
        assert_eq!(
            kv_block_bytes(&t, LayerType::Sliding, 16, 2),
            2 * 29 * 4 * 256 * 16 * 2
        );
    }
}
