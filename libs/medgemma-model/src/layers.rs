//! The decoder's building blocks, in the manner of candle's model files: [`RmsNorm`],
//! [`Attention`], [`Mlp`] and the [`Layer`] that chains them, each with a short `forward`, plus
//! the [`Batch`] context one forward call builds once and every layer reads (the packed rows
//! of each sequence, RoPE tables, attention masks).
//!
//! Attention runs per sequence against that sequence's block table, in blocks of query rows
//! sized so that no score matrix exceeds [`MAX_SCORE_BYTES`]: a long prefill chunk never
//! materialises an n x n score matrix.

use candle_core::{DType, Device, Tensor};

use crate::config::{LayerType, TextConfig};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::SeqInput;
use crate::weights::Linear;

/// The largest f32 score matrix (all heads of one query block against its keys) attention
/// builds at once; longer inputs are split into blocks of query rows.
pub(crate) const MAX_SCORE_BYTES: usize = 64 << 20;

/// Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, in f32, cast back.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    /// 1 + w, f32.
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        candle_nn::ops::rms_norm(&xf.contiguous()?, &self.weight, self.eps)?.to_dtype(dt)
    }
}

/// Projections that share an input, fused into one matmul when their storage allows.
#[derive(Debug)]
pub(crate) enum Projections {
    Fused { w: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    pub fn new(parts: Vec<Linear>, widths: Vec<usize>) -> Result<Self> {
        Ok(match crate::weights::fuse(&parts)? {
            Some(w) => Self::Fused { w, widths },
            None => Self::Separate(parts),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Fused { w, widths } => {
                let y = w.forward(x)?;
                let mut off = 0;
                widths
                    .iter()
                    .map(|&n| {
                        let part = y.narrow(1, off, n);
                        off += n;
                        part
                    })
                    .collect()
            }
            Self::Separate(ws) => ws.iter().map(|w| w.forward(x)).collect(),
        }
    }
}

/// The gated MLP: `down(gelu_tanh(gate(x)) * up(x))`.
#[derive(Debug)]
pub(crate) struct Mlp {
    pub gate_up: Projections,
    pub down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        self.down
            .forward(&crate::cpu_ops::gelu_mul(&gu[0], &gu[1])?)
    }
}

/// Grouped-query self-attention with q/k norms, RoPE and a paged KV cache.
#[derive(Debug)]
pub(crate) struct Attention {
    pub kind: LayerType,
    pub qkv: Projections,
    pub o: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `query_pre_attn_scalar^-0.5`.
    pub scale: f64,
}

impl Attention {
    /// `x` holds the packed new rows of every sequence in `batch`; their keys and values are
    /// written to `kv` for layer `li`, and each sequence attends over its own cached rows.
    fn forward(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &Batch,
        kv: &KvCache,
        batch: &[SeqInput<'_>],
    ) -> Result<Tensor> {
        let (total, nh, nkv, hd) = (ctx.total, self.heads, self.kv_heads, self.head_dim);
        let qkv = self.qkv.forward(x)?;
        let q = self
            .q_norm
            .forward(&qkv[0].contiguous()?.reshape((total, nh, hd))?)?;
        let k = self
            .k_norm
            .forward(&qkv[1].contiguous()?.reshape((total, nkv, hd))?)?;
        let v = qkv[2].contiguous()?.reshape((total, nkv, hd))?;
        let (cos, sin) = &ctx.rope[kind_index(self.kind)];
        let rope = |t: &Tensor| -> candle_core::Result<Tensor> {
            candle_nn::rotary_emb::rope(&t.transpose(0, 1)?.contiguous()?.unsqueeze(0)?, cos, sin)?
                .squeeze(0)
        };
        let (q, k) = (rope(&q)?, rope(&k)?);
        let v = v.transpose(0, 1)?.contiguous()?;
        if let Some(pb) = &ctx.paged[kind_index(self.kind)] {
            return self.forward_paged(li, &q, &k, &v, pb, kv);
        }
        for (rows, item) in ctx.rows.iter().zip(batch) {
            if rows.n > 0 {
                let (o, n) = (rows.offset, rows.n);
                kv.write(item.kv, li, &k.narrow(1, o, n)?, &v.narrow(1, o, n)?)?;
            }
        }
        let width = nh * hd;
        let decoded = self.decode_in_place(&q, kv, ctx, batch, li)?;
        let attn = match decoded {
            // Every row decodes: the kernel's rows are the packed rows.
            Some(d) if ctx.rows.iter().all(|r| r.n <= 1) => {
                Tensor::from_vec(d, (total, width), q.device())?
            }
            decoded => {
                let mut parts = Vec::with_capacity(batch.len());
                let mut next = 0;
                for (rows, item) in ctx.rows.iter().zip(batch) {
                    let (o, n) = (rows.offset, rows.n);
                    if n == 0 {
                        continue;
                    }
                    if n == 1
                        && let Some(d) = &decoded
                    {
                        parts.push(Tensor::from_slice(
                            &d[next * width..(next + 1) * width],
                            (1, width),
                            q.device(),
                        )?);
                        next += 1;
                        continue;
                    }
                    let masks = &rows.masks[kind_index(self.kind)];
                    let (kk, vv, _first) = kv.gather(item.kv, li, rows.start + n)?;
                    let out = self.attend(&q.narrow(1, o, n)?, &kk, &vv, masks)?;
                    parts.push(out.transpose(0, 1)?.contiguous()?.reshape((n, width))?);
                }
                if parts.len() == 1 {
                    parts.pop().expect("one part")
                } else {
                    Tensor::cat(&parts, 0)?
                }
            }
        };
        Ok(self.o.forward(&attn)?)
    }

    /// The GPU-shaped path: every packed row's keys and values written to the layer's pools
    /// in one launch each, then one attention launch over all sequences (`q`, `k`, `v`:
    /// `[heads, total, head_dim]` after RoPE), the mask computed in the kernel.
    fn forward_paged(
        &self,
        li: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pb: &crate::paged::PagedBatch,
        kv: &KvCache,
    ) -> Result<Tensor> {
        kv.write_paged(li, k, v, pb)?;
        let (kp, vp) = kv.pool(li).ok_or_else(|| {
            crate::error::ModelError::InvalidInput("paged KV pool missing".into())
        })?;
        let dims = crate::paged::AttnDims {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
        };
        let out = crate::paged::attention(q, kp, vp, pb, dims)?;
        Ok(self
            .o
            .forward(&out.reshape((pb.total, self.heads * self.head_dim))?)?)
    }

    /// The attention of every decoding sequence (one new row) of the batch, `q` `[heads, total,
    /// head_dim]`: `[decoding sequences, heads * head_dim]` in batch order, from the cached rows
    /// read in place on the CPU in f32 (`cpu_attention`). `None` where the cache is not f32 on
    /// the CPU (the tensor path then runs) or nothing decodes.
    fn decode_in_place(
        &self,
        q: &Tensor,
        kv: &KvCache,
        ctx: &Batch,
        batch: &[SeqInput<'_>],
        li: usize,
    ) -> Result<Option<Vec<f32>>> {
        let decoding: Vec<usize> = (0..batch.len()).filter(|&i| ctx.rows[i].n == 1).collect();
        if decoding.is_empty() || q.dtype() != DType::F32 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (nh, hd, total) = (self.heads, self.head_dim, ctx.total);
        let all: Vec<f32> = q.flatten_all()?.to_vec1()?;
        // `[heads, total, head_dim]` -> the decoding rows as `[seqs, heads, head_dim]`.
        let mut qs = Vec::with_capacity(decoding.len() * nh * hd);
        let mut masks = Vec::with_capacity(decoding.len());
        let mut seqs = Vec::with_capacity(decoding.len());
        for &i in &decoding {
            let r = &ctx.rows[i];
            for h in 0..nh {
                qs.extend_from_slice(&all[(h * total + r.offset) * hd..][..hd]);
            }
            masks.push(match r.masks[kind_index(self.kind)].blocks.first() {
                Some(Some(m)) => Some(m.flatten_all()?.to_vec1::<f32>()?),
                _ => None,
            });
            seqs.push((&*batch[i].kv, r.start + 1));
        }
        let dims = crate::cpu_attention::DecodeDims {
            heads: nh,
            kv_heads: self.kv_heads,
            head_dim: hd,
            scale: self.scale as f32,
        };
        kv.with_cpu_rows(&seqs, li, |rows| {
            crate::cpu_attention::decode_attention(&qs, rows, &masks, dims)
        })
    }

    /// One sequence's rows `q` (`[heads, n, head_dim]`) against its keys and values
    /// (`[kv_heads, L, head_dim]`), one block of query rows per mask block.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, masks: &MaskBlocks) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let g = nh / nkv;
        let (n, l) = (q.dim(1)?, k.dim(1)?);
        let kt = k.t()?;
        let mut outs = Vec::with_capacity(masks.blocks.len());
        for (bi, mask) in masks.blocks.iter().enumerate() {
            let r0 = bi * masks.rows;
            let m = masks.rows.min(n - r0);
            let qi = q
                .narrow(1, r0, m)?
                .contiguous()?
                .reshape((nkv, g * m, hd))?;
            let scores = (qi.matmul(&kt)? * self.scale)?
                .to_dtype(DType::F32)?
                .reshape((nkv, g, m, l))?;
            let scores = match mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?
                .to_dtype(v.dtype())?
                .reshape((nkv, g * m, l))?;
            outs.push(probs.matmul(v)?.reshape((nh, m, hd))?);
        }
        Ok(if outs.len() == 1 {
            outs.pop().expect("one block")
        } else {
            Tensor::cat(&outs, 1)?
        })
    }
}

/// One decoder layer with Gemma 3's sandwich norms.
#[derive(Debug)]
pub(crate) struct Layer {
    pub input_norm: RmsNorm,
    pub attn: Attention,
    pub post_attn_norm: RmsNorm,
    pub pre_ff_norm: RmsNorm,
    pub mlp: Mlp,
    pub post_ff_norm: RmsNorm,
}

impl Layer {
    pub fn forward(
        &self,
        li: usize,
        h: &Tensor,
        ctx: &Batch,
        kv: &KvCache,
        batch: &[SeqInput<'_>],
    ) -> Result<Tensor> {
        let x = self.input_norm.forward(h)?;
        let attn = self.attn.forward(li, &x, ctx, kv, batch)?;
        let h = (h + self.post_attn_norm.forward(&attn)?)?;
        let mlp = self.mlp.forward(&self.pre_ff_norm.forward(&h)?)?;
        Ok((h + self.post_ff_norm.forward(&mlp)?)?)
    }
}

/// The masks of one sequence for one layer kind: one per block of `rows` query rows (`None`
/// where every key is visible), each `[rows, L]` additive f32.
#[derive(Debug, Default)]
pub(crate) struct MaskBlocks {
    pub rows: usize,
    pub blocks: Vec<Option<Tensor>>,
}

/// One sequence's share of the packed rows.
#[derive(Debug)]
pub(crate) struct SeqRows {
    /// First packed row.
    pub offset: usize,
    /// New rows.
    pub n: usize,
    /// Position of the first new row.
    pub start: usize,
    /// Per layer kind (sliding, global).
    pub masks: [MaskBlocks; 2],
}

/// What one forward call builds once and every layer shares.
#[derive(Debug)]
pub(crate) struct Batch {
    pub total: usize,
    pub rows: Vec<SeqRows>,
    /// `(cos, sin)` per layer kind (sliding, global), one row per packed position.
    pub rope: [(Tensor, Tensor); 2],
    /// With a paged KV cache: the metadata of the paged attention per layer kind (then no
    /// host masks are built).
    pub paged: [Option<crate::paged::PagedBatch>; 2],
}

pub(crate) fn kind_index(kind: LayerType) -> usize {
    match kind {
        LayerType::Sliding => 0,
        LayerType::Global => 1,
    }
}

/// Runs of consecutive image tokens, numbered; `None` for text rows.
pub(crate) fn image_groups(tokens: &[u32], image: Option<u32>) -> Vec<Option<u32>> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut group = 0u32;
    let mut prev = false;
    for &t in tokens {
        let is = Some(t) == image;
        if is && !prev {
            group += 1;
        }
        out.push(is.then_some(group));
        prev = is;
    }
    out
}

/// The attention masks of one sequence's new rows for one layer kind: `n` rows at positions
/// `start..` against the keys `first..start + n`, in blocks of query rows that keep every score
/// matrix under [`MAX_SCORE_BYTES`]. Visible: window (sliding layers) AND (causal OR the same
/// image as the query).
pub(crate) struct MaskSpec<'a> {
    pub start: usize,
    pub n: usize,
    pub first: usize,
    pub kind: LayerType,
    pub groups: &'a [Option<u32>],
}

impl MaskSpec<'_> {
    pub fn build(&self, text: &TextConfig, device: &Device) -> Result<MaskBlocks> {
        let (start, n, first) = (self.start, self.n, self.first);
        let l = start + n - first;
        let per_row = text.num_attention_heads * l * std::mem::size_of::<f32>();
        let rows = (MAX_SCORE_BYTES / per_row.max(1)).clamp(1, n.max(1));
        let w = text.sliding_window;
        let visible = |q: usize, k: usize| -> bool {
            let same_image = k >= start
                && matches!((self.groups[q - start], self.groups[k - start]), (Some(a), Some(b)) if a == b);
            let causal_or_image = k <= q || same_image;
            match self.kind {
                LayerType::Global => causal_or_image,
                LayerType::Sliding => q < k + w && causal_or_image,
            }
        };
        let mut blocks = Vec::with_capacity(n.div_ceil(rows));
        for r0 in (0..n).step_by(rows) {
            let m = rows.min(n - r0);
            let mut all = true;
            let mut data = Vec::with_capacity(m * l);
            for qi in r0..r0 + m {
                for kj in 0..l {
                    let ok = visible(start + qi, first + kj);
                    all &= ok;
                    data.push(if ok { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            blocks.push(if all {
                None
            } else {
                Some(Tensor::from_vec(data, (m, l), device)?)
            });
        }
        Ok(MaskBlocks { rows, blocks })
    }
}
