//! The SigLIP vision tower and the Gemma 3 multimodal projector, as transformers computes them
//! (`SiglipVisionModel` without the pooling head, `Gemma3MultiModalProjector`).
//!
//! - Patch embedding: the stride-equals-kernel convolution is a reshape and one matmul.
//! - Encoder layers: pre-LayerNorm, fused QKV, softmax in f32 whatever the weight dtype, the
//!   tanh GELU MLP. Attention runs in head groups whose score matrices stay under a byte budget,
//!   so 4096 patches (896 px, patch 14) never materialise all heads' 4096 x 4096 scores at once.
//! - Projector: average pool over `patches_per_side / sqrt(mm_tokens_per_image)` squares, the
//!   soft-embedding RMSNorm (`x / rms * (1 + w)`, eps = the tower's `layer_norm_eps`), then
//!   `x @ mm_input_projection_weight`.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::attention;
use crate::error::{Result, VisionError};
use medgemma_model::cpu_ops;

/// `vision_config` of a Gemma 3 checkpoint (SigLIP), with transformers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SiglipConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
}

impl Default for SiglipConfig {
    /// SigLIP so400m-patch14 at 896 px: MedGemma 4B's tower.
    fn default() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 896,
            patch_size: 14,
            layer_norm_eps: 1e-6,
        }
    }
}

fn get_usize(v: &Value, key: &str, default: usize) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| VisionError::Config(format!("{key} is not a non-negative integer"))),
    }
}

impl SiglipConfig {
    /// Reads `vision_config` (missing keys take `SiglipVisionConfig`'s defaults: 768 wide,
    /// 12 layers, 224 px, patch 16).
    pub fn from_json(v: &Value) -> Result<Self> {
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && !matches!(act, "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast")
        {
            return Err(VisionError::Config(format!(
                "vision hidden_act {act:?} is not supported (SigLIP uses gelu_pytorch_tanh)"
            )));
        }
        if v.get("vision_use_head").and_then(Value::as_bool) == Some(true) {
            tracing::debug!("vision_use_head is set; Gemma 3 ignores the pooling head");
        }
        let cfg = Self {
            hidden_size: get_usize(v, "hidden_size", 768)?,
            intermediate_size: get_usize(v, "intermediate_size", 3072)?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", 12)?,
            num_attention_heads: get_usize(v, "num_attention_heads", 12)?,
            num_channels: get_usize(v, "num_channels", 3)?,
            image_size: get_usize(v, "image_size", 224)?,
            patch_size: get_usize(v, "patch_size", 16)?,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VisionError::Config(m));
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.patch_size == 0 {
            return bad(
                "vision hidden_size, num_attention_heads and patch_size must be > 0".into(),
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "vision hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.num_channels != 3 {
            return bad(format!(
                "vision num_channels {} (only RGB, 3, is supported)",
                self.num_channels
            ));
        }
        Ok(())
    }

    /// Patches along one side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per image (the tower's sequence length).
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Where the tower's and projector's tensors live in a checkpoint.
pub trait TensorSource {
    /// Loads `name` (relative: `embeddings.patch_embedding.weight`,
    /// `mm_input_projection_weight`, ...) for the tower (`projector == false`) or the projector.
    fn get(&self, projector: bool, name: &str) -> Result<Tensor>;
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(src: &dyn TensorSource, prefix: &str, eps: f64) -> Result<Self> {
        Ok(Self {
            w: src.get(false, &format!("{prefix}.weight"))?,
            b: src.get(false, &format!("{prefix}.bias"))?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.w, &self.b, self.eps)?)
    }
}

/// `x @ w^T + b` with `w` stored transposed (`[in, out]`, contiguous) at load.
struct Linear {
    wt: Tensor,
    b: Tensor,
}

impl Linear {
    fn new(w: Tensor, b: Tensor) -> Result<Self> {
        Ok(Self {
            wt: w.t()?.contiguous()?,
            b,
        })
    }

    fn load(src: &dyn TensorSource, prefix: &str) -> Result<Self> {
        Self::new(
            src.get(false, &format!("{prefix}.weight"))?,
            src.get(false, &format!("{prefix}.bias"))?,
        )
    }

    /// `x`: `[n, in]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(cpu_ops::bias_act(x.matmul(&self.wt)?, &self.b, false)?)
    }

    /// `gelu_tanh(x @ w^T + b)`.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(cpu_ops::bias_act(x.matmul(&self.wt)?, &self.b, true)?)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    qkv: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Query rows per attention block on the CPU (a 256 x 4096 f32 score block is 4 MiB).
const QUERY_BLOCK: usize = 256;

/// Bytes of f32 attention scores computed at once (per head group) off the CPU fast path.
const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// The SigLIP vision transformer (embeddings, encoder, post-LayerNorm).
pub struct SiglipTower {
    cfg: SiglipConfig,
    /// `[channels * patch * patch, hidden]`, rows in (c, y, x) order like the conv kernel.
    patch_wt: Tensor,
    patch_b: Tensor,
    /// `[patches, hidden]`.
    pos: Tensor,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    dtype: DType,
}

impl std::fmt::Debug for SiglipTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiglipTower")
            .field("cfg", &self.cfg)
            .field("dtype", &self.dtype)
            .finish()
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn expect_shape(t: &Tensor, want: &[usize], name: &str) -> Result<()> {
    if t.dims() != want {
        return Err(VisionError::Config(format!(
            "tensor {name} has shape {:?}, the config implies {want:?}",
            t.dims()
        )));
    }
    Ok(())
}

impl SiglipTower {
    /// Loads the tower from `src`, converting every tensor to `dtype`.
    pub fn load(cfg: &SiglipConfig, src: &dyn TensorSource, dtype: DType) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let c = cfg.num_channels;
        let conv_w = src.get(false, "embeddings.patch_embedding.weight")?;
        expect_shape(&conv_w, &[h, c, p, p], "embeddings.patch_embedding.weight")?;
        let patch_b = src.get(false, "embeddings.patch_embedding.bias")?;
        let pos = src.get(false, "embeddings.position_embedding.weight")?;
        expect_shape(
            &pos,
            &[cfg.num_patches(), h],
            "embeddings.position_embedding.weight",
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let pre = format!("encoder.layers.{i}");
            let qkv_w = Tensor::cat(
                &[
                    src.get(false, &format!("{pre}.self_attn.q_proj.weight"))?,
                    src.get(false, &format!("{pre}.self_attn.k_proj.weight"))?,
                    src.get(false, &format!("{pre}.self_attn.v_proj.weight"))?,
                ],
                0,
            )?;
            expect_shape(&qkv_w, &[3 * h, h], &format!("{pre}.self_attn.qkv"))?;
            let qkv_b = Tensor::cat(
                &[
                    src.get(false, &format!("{pre}.self_attn.q_proj.bias"))?,
                    src.get(false, &format!("{pre}.self_attn.k_proj.bias"))?,
                    src.get(false, &format!("{pre}.self_attn.v_proj.bias"))?,
                ],
                0,
            )?;
            let fc1 = Linear::load(src, &format!("{pre}.mlp.fc1"))?;
            expect_shape(
                &fc1.wt,
                &[h, cfg.intermediate_size],
                &format!("{pre}.mlp.fc1.weight^T"),
            )?;
            layers.push(EncoderLayer {
                ln1: LayerNorm::load(src, &format!("{pre}.layer_norm1"), cfg.layer_norm_eps)?,
                qkv: Linear::new(qkv_w, qkv_b)?,
                out: Linear::load(src, &format!("{pre}.self_attn.out_proj"))?,
                ln2: LayerNorm::load(src, &format!("{pre}.layer_norm2"), cfg.layer_norm_eps)?,
                fc1,
                fc2: Linear::load(src, &format!("{pre}.mlp.fc2"))?,
            });
        }
        let post_ln = LayerNorm::load(src, "post_layernorm", cfg.layer_norm_eps)?;
        let mut tower = Self {
            cfg: cfg.clone(),
            patch_wt: conv_w.reshape((h, c * p * p))?.t()?.contiguous()?,
            patch_b,
            pos,
            layers,
            post_ln,
            dtype,
        };
        tower.cast(dtype)?;
        Ok(tower)
    }

    fn cast(&mut self, dtype: DType) -> Result<()> {
        let cv = |t: &mut Tensor| -> Result<()> {
            *t = t.to_dtype(dtype)?;
            Ok(())
        };
        cv(&mut self.patch_wt)?;
        cv(&mut self.patch_b)?;
        cv(&mut self.pos)?;
        for l in &mut self.layers {
            for lin in [&mut l.qkv, &mut l.out, &mut l.fc1, &mut l.fc2] {
                cv(&mut lin.wt)?;
                cv(&mut lin.b)?;
            }
            for ln in [&mut l.ln1, &mut l.ln2] {
                cv(&mut ln.w)?;
                cv(&mut ln.b)?;
            }
        }
        cv(&mut self.post_ln.w)?;
        cv(&mut self.post_ln.b)?;
        self.dtype = dtype;
        Ok(())
    }

    pub fn config(&self) -> &SiglipConfig {
        &self.cfg
    }

    /// Bytes held by the tower's weights.
    pub fn weight_bytes(&self) -> usize {
        let mut ts: Vec<&Tensor> = vec![
            &self.patch_wt,
            &self.patch_b,
            &self.pos,
            &self.post_ln.w,
            &self.post_ln.b,
        ];
        for l in &self.layers {
            for lin in [&l.qkv, &l.out, &l.fc1, &l.fc2] {
                ts.extend([&lin.wt, &lin.b]);
            }
            for ln in [&l.ln1, &l.ln2] {
                ts.extend([&ln.w, &ln.b]);
            }
        }
        ts.iter().map(|t| tensor_bytes(t)).sum()
    }

    /// `pixel_values` `[b, 3, size, size]` -> last hidden state `[b, patches, hidden]`.
    ///
    /// One pass for the whole batch: the patches of the `b` images are packed row-wise
    /// (`[b * patches, ...]`), so the patch embedding and every LayerNorm, projection and MLP
    /// matmul runs once over all of them; only attention runs image by image (images never
    /// attend to each other). Every row is computed as when its image runs alone.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = pixel_values.dims4()?;
        let s = self.cfg.image_size;
        if c != self.cfg.num_channels || hh != s || ww != s {
            return Err(VisionError::InvalidArgument(format!(
                "pixel values of shape [{b}, {c}, {hh}, {ww}]; the tower takes [n, 3, {s}, {s}]"
            )));
        }
        if b == 0 {
            return Err(VisionError::InvalidArgument(
                "pixel values of an empty batch".into(),
            ));
        }
        let p = self.cfg.patch_size;
        let g = self.cfg.patches_per_side();
        let n = g * g;
        // [b, c, g*p, g*p] -> [b, c, g, p, g, p] -> [b, g, g, c, p, p] -> [b*g*g, c*p*p]
        let patches = pixel_values
            .to_dtype(self.dtype)?
            .reshape(vec![b, c, g, p, g, p])?
            .permute([0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b * n, c * p * p))?;
        let patches = patches.matmul(&self.patch_wt)?;
        let mut x =
            cpu_ops::add_tiled(cpu_ops::bias_act(patches, &self.patch_b, false)?, &self.pos)?;
        for l in &self.layers {
            let h = l.ln1.forward(&x)?;
            let qkv = l.qkv.forward(&h)?;
            let h = if b == 1 {
                self.attention(&qkv)?
            } else {
                let per_image = (0..b)
                    .map(|i| self.attention(&qkv.narrow(0, i * n, n)?))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&per_image, 0)?
            };
            x = cpu_ops::add(l.out.forward(&h)?, &x)?;
            let h = l.ln2.forward(&x)?;
            let h = l.fc1.forward_gelu(&h)?;
            x = cpu_ops::add(l.fc2.forward(&h)?, &x)?;
        }
        Ok(self
            .post_ln
            .forward(&x)?
            .reshape((b, n, self.cfg.hidden_size))?)
    }

    /// Bidirectional attention over one image's patches; `qkv` is `[n, 3 * hidden]`.
    fn attention(&self, qkv: &Tensor) -> Result<Tensor> {
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.head_dim();
        let scale = (hd as f64).powf(-0.5);
        if let Some(o) = attention::try_fused(qkv, heads, hd, scale as f32)? {
            return Ok(o);
        }
        attention_unfused(qkv, heads, hd, self.dtype)
    }
}

/// Attention without the fused kernel (no AVX-512F, bf16, CUDA): score blocks through
/// matmuls, with our softmax in between.
fn attention_unfused(qkv: &Tensor, heads: usize, hd: usize, dtype: DType) -> Result<Tensor> {
    let n = qkv.dim(0)?;
    let hidden = heads * hd;
    let scale = (hd as f64).powf(-0.5);
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
        // Per head, blocks of query rows, straight from strided views of `qkv` (no
        // copies): score blocks stay in cache and the allocator reuses them; the scale is
        // folded into our softmax.
        let qkv = qkv.contiguous()?;
        let one_head = |h: usize| -> Result<Tensor> {
            let qh = qkv.narrow(1, h * hd, hd)?;
            let kt = qkv.narrow(1, hidden + h * hd, hd)?.t()?;
            let vh = qkv.narrow(1, 2 * hidden + h * hd, hd)?;
            let mut blocks = Vec::with_capacity(n.div_ceil(QUERY_BLOCK));
            let mut r = 0;
            while r < n {
                let b = QUERY_BLOCK.min(n - r);
                let s = qh.narrow(0, r, b)?.matmul(&kt)?;
                blocks.push(cpu_ops::softmax_last_dim(s, scale)?.matmul(&vh)?);
                r += b;
            }
            Ok(Tensor::cat(&blocks, 0)?)
        };
        // Heads run in parallel, one per core: each head's small matmuls then run on the
        // thread that owns it instead of splitting every 256 x 4096 block across threads.
        use rayon::prelude::*;
        let heads_out = (0..heads)
            .into_par_iter()
            .map(one_head)
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&heads_out, 1)?);
    }
    let split = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(1, i * hidden, hidden)?
            .reshape((n, heads, hd))?
            .transpose(0, 1)?
            .contiguous()?)
    };
    let q = (split(0)? * scale)?;
    let k = split(1)?;
    let v = split(2)?;
    let group = (SCORE_BUDGET_BYTES / (n * n * 4).max(1)).clamp(1, heads);
    let mut outs = Vec::with_capacity(heads.div_ceil(group));
    let mut h0 = 0;
    while h0 < heads {
        let g = group.min(heads - h0);
        let qg = q.narrow(0, h0, g)?;
        let kg = k.narrow(0, h0, g)?;
        let vg = v.narrow(0, h0, g)?;
        let scores = qg.matmul(&kg.t()?)?.to_dtype(DType::F32)?;
        let probs = cpu_ops::softmax_last_dim(scores, 1.0)?.to_dtype(dtype)?;
        outs.push(probs.matmul(&vg)?);
        h0 += g;
    }
    let o = if outs.len() == 1 {
        outs.pop().expect("one group")
    } else {
        Tensor::cat(&outs, 0)?
    };
    Ok(o.transpose(0, 1)?.contiguous()?.reshape((n, hidden))?)
}

/// `Gemma3MultiModalProjector`: pool, soft-embedding RMSNorm, projection to the text width.
pub struct Projector {
    /// `1 + w`, f32.
    norm: Tensor,
    eps: f32,
    /// `[vision_hidden, text_hidden]`.
    proj: Tensor,
    patches_per_side: usize,
    kernel: usize,
    dtype: DType,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("kernel", &self.kernel)
            .field("proj", &self.proj.dims())
            .finish()
    }
}

impl Projector {
    /// The pooling kernel: `patches_per_side / sqrt(mm_tokens_per_image)`, which must divide.
    pub fn kernel_size(cfg: &SiglipConfig, mm_tokens_per_image: usize) -> Result<usize> {
        let side = (mm_tokens_per_image as f64).sqrt().round() as usize;
        let pps = cfg.patches_per_side();
        if side == 0 || side * side != mm_tokens_per_image || !pps.is_multiple_of(side) {
            return Err(VisionError::Config(format!(
                "mm_tokens_per_image {mm_tokens_per_image} must be a square whose side divides \
                 the {pps} patches per side"
            )));
        }
        Ok(pps / side)
    }

    pub fn load(
        cfg: &SiglipConfig,
        mm_tokens_per_image: usize,
        text_hidden: usize,
        src: &dyn TensorSource,
        dtype: DType,
    ) -> Result<Self> {
        let kernel = Self::kernel_size(cfg, mm_tokens_per_image)?;
        let w = src.get(true, "mm_soft_emb_norm.weight")?;
        expect_shape(&w, &[cfg.hidden_size], "mm_soft_emb_norm.weight")?;
        let proj = src.get(true, "mm_input_projection_weight")?;
        expect_shape(
            &proj,
            &[cfg.hidden_size, text_hidden],
            "mm_input_projection_weight",
        )?;
        Ok(Self {
            norm: (w.to_dtype(DType::F32)? + 1.0)?,
            eps: cfg.layer_norm_eps as f32,
            proj: proj.to_dtype(dtype)?,
            patches_per_side: cfg.patches_per_side(),
            kernel,
            dtype,
        })
    }

    /// Bytes held by the projector's weights.
    pub fn weight_bytes(&self) -> usize {
        tensor_bytes(&self.norm) + tensor_bytes(&self.proj)
    }

    /// `[b, patches, vision_hidden]` -> `[b, mm_tokens_per_image, text_hidden]`.
    pub fn forward(&self, tower_out: &Tensor) -> Result<Tensor> {
        let (b, n, d) = tower_out.dims3()?;
        let p = self.patches_per_side;
        if n != p * p {
            return Err(VisionError::InvalidArgument(format!(
                "tower output has {n} patches, the projector expects {}",
                p * p
            )));
        }
        let x = tower_out
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, p, p))?
            .to_dtype(DType::F32)?;
        let pooled = x.avg_pool2d(self.kernel)?;
        let t = pooled.dim(2)? * pooled.dim(3)?;
        let x = pooled.reshape((b, d, t))?.transpose(1, 2)?.contiguous()?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?.to_dtype(self.dtype)?;
        Ok(x.broadcast_matmul(&self.proj)?)
    }
}

/// Fills tensors of a random tower (the demo) from a seeded generator, in the real layouts.
pub(crate) fn random_tensor(
    shape: &[usize],
    std: f32,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    // Irwin-Hall approximation of a normal: sum of 4 uniforms, centred and scaled.
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
            s * std * 3f32.sqrt()
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernel (where this CPU runs it) and the matmul path agree, on a shape off
    /// every tile size; the tower tests then pin whichever path runs to transformers.
    #[test]
    fn fused_and_unfused_attention_agree() {
        let (n, heads, hd) = (301, 3, 24);
        let qkv = Tensor::randn(0f32, 1.0, (n, 3 * heads * hd), &Device::Cpu).unwrap();
        let unfused = attention_unfused(&qkv, heads, hd, DType::F32).unwrap();
        let scale = (hd as f32).powf(-0.5);
        let fused = match attention::try_fused(&qkv, heads, hd, scale).unwrap() {
            Some(t) => t,
            None => {
                eprintln!("no AVX-512F: comparing against the portable fused build");
                let src: Vec<f32> = qkv.flatten_all().unwrap().to_vec1().unwrap();
                let mut out = vec![0f32; n * heads * hd];
                attention::attention(&src, n, heads, hd, scale, &mut out, true);
                Tensor::from_vec(out, (n, heads * hd), &Device::Cpu).unwrap()
            }
        };
        let diff = medgemma_test_support::max_abs_diff(&fused, &unfused);
        assert!(diff < 1e-5, "max |fused - unfused| = {diff}");
    }
}
