//! The Gemma 3 text decoder (MedGemma 27B text, and the decoder of MedGemma 4B).
//!
//! One forward call takes several sequences at once, each with its own positions: their new
//! tokens are packed row-wise so every matrix multiply runs once for the whole batch, and only
//! attention loops over sequences (against each sequence's own block table). Prefill, chunked
//! prefill and a decode step over many sequences of different lengths are all the same call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::config::{LayerType, ModelConfig, MultimodalConfig, RopeParams};
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvCacheConfig, SequenceKv};
use crate::layers::{
    Attention, Batch, Layer, MaskBlocks, MaskSpec, Mlp, Projections, RmsNorm, SeqRows,
    image_groups, kind_index,
};
use crate::paged::{PagedBatch, SeqPlan};
use crate::weights::{
    Embedding, GgufSource, HfSource, LayerWeight, Linear, Quantize, Raw, SafetensorsCheckpoint,
    WeightName, WeightSource, write_gguf_cache,
};

/// The dtype weights and activations run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelDType {
    /// The fast CPU path and the parity reference.
    F32,
    /// The production dtype on CUDA (Gemma 3 was trained in bf16); also runs on CPU.
    BF16,
    /// Refused: Gemma 3 overflows in fp16 (NaNs / empty output).
    F16,
}

impl std::str::FromStr for ModelDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            other => Err(format!("unknown dtype {other:?} (expected f32 or bf16)")),
        }
    }
}

impl ModelDType {
    /// The candle dtype (f16 is refused: Gemma 3 overflows in fp16).
    pub fn to_candle(self) -> Result<DType> {
        match self {
            Self::F32 => Ok(DType::F32),
            Self::BF16 => Ok(DType::BF16),
            Self::F16 => Err(ModelError::Dtype(
                "f16 is not supported for Gemma 3: it was trained in bf16 and overflows in fp16 \
                 (NaNs or empty output); use --dtype bf16 or f32"
                    .into(),
            )),
        }
    }
}

/// Reports loading progress as (tensors done, tensors total).
pub type ProgressFn = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    pub dtype: ModelDType,
    pub device: Device,
    /// Quantize safetensors weights at load (ignored for GGUF, which is already quantized).
    pub quantize: Option<Quantize>,
    /// Run a GGUF file's weights dequantized to f32 (the parity mode).
    pub dequantize: bool,
    /// Where quantized safetensors models are cached as GGUF; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("quantize", &self.quantize)
            .field("dequantize", &self.dequantize)
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: ModelDType::F32,
            device: Device::Cpu,
            quantize: None,
            dequantize: false,
            cache_dir: None,
            progress: None,
        }
    }
}

/// What was loaded, for logs and `--json` output.
#[derive(Debug, Clone, Default)]
pub struct LoadInfo {
    /// "safetensors", "gguf" or "gguf-cache".
    pub format: String,
    /// Bytes of weights held in memory.
    pub weight_bytes: usize,
    /// Count of tensors per storage type, e.g. {"Q4K": 126, "F32": 109}.
    pub tensor_types: std::collections::BTreeMap<String, usize>,
    /// The GGUF quantization cache used or written, if any.
    pub cache_file: Option<PathBuf>,
    /// Whether the cache file was read (true) or written/kept in memory (false).
    pub cache_hit: bool,
}

/// Which logits a sequence wants back from a forward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsRows {
    /// None (e.g. a prefill chunk that is not the last).
    None,
    /// Only the last new row: what generation needs.
    Last,
    /// Every new row (perplexity, parity tests).
    All,
}

/// One sequence's share of a forward call.
#[derive(Debug)]
pub struct SeqInput<'a> {
    /// The sequence's cache; new tokens take positions `kv.len()..`.
    pub kv: &'a mut SequenceKv,
    /// New token ids.
    pub tokens: &'a [u32],
    /// Embeddings `[n_image_tokens, hidden]` spliced at the image-token rows, in order.
    pub image_embeds: Option<&'a Tensor>,
    pub logits: LogitsRows,
}

/// A loaded Gemma 3 decoder. Immutable and shareable; per-sequence state lives in a
/// [`KvCache`].
#[derive(Debug)]
pub struct Gemma3 {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    embed: Embedding,
    embed_scale: f64,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    lm_head: Linear,
    inv_freq_local: Vec<f32>,
    inv_freq_global: Vec<f32>,
    info: LoadInfo,
}

fn inv_freq(head_dim: usize, rope: &RopeParams) -> Vec<f32> {
    // As transformers: base ** (arange(0, dim, 2) / dim) in f32, then / factor.
    let base = rope.theta as f32;
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0f32 / base.powf(e) / rope.linear_factor as f32
        })
        .collect()
}

/// Records the quantized tensors a source hands out, to write the GGUF cache afterwards.
struct Recording<'a, S: WeightSource> {
    inner: &'a mut S,
    tensors: Vec<(String, Arc<QTensor>)>,
}

impl<S: WeightSource> WeightSource for Recording<'_, S> {
    fn fetch(&mut self, name: WeightName, shape: &[usize], device: &Device) -> Result<Raw> {
        let raw = self.inner.fetch(name, shape, device)?;
        match &raw {
            Raw::Quant(q) => self.tensors.push((name.gguf(), q.clone())),
            Raw::Dense(t) => {
                let q = QTensor::quantize(
                    &t.to_dtype(DType::F32)?,
                    candle_core::quantized::GgmlDType::F32,
                )?;
                self.tensors.push((name.gguf(), Arc::new(q)));
            }
        }
        Ok(raw)
    }
    fn has_lm_head(&self) -> bool {
        self.inner.has_lm_head()
    }
}

impl Gemma3 {
    /// Loads a model from a Hugging Face checkpoint directory or a `.gguf` file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let dtype = opts.dtype.to_candle()?;
        // Activations (and the KV cache) of a quantized model: f32 on the CPU, where our
        // kernels take f32; the asked dtype (bf16 by default) on CUDA, half the KV bytes.
        let quant_act = if opts.device.is_cuda() {
            dtype
        } else {
            DType::F32
        };
        if !path.exists() {
            return Err(ModelError::checkpoint(path, "no such file or directory"));
        }
        if path.is_file() {
            let is_gguf = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            if !is_gguf {
                return Err(ModelError::checkpoint(
                    path,
                    "expected a .gguf file or a Hugging Face checkpoint directory",
                ));
            }
            if opts.quantize.is_some() {
                return Err(ModelError::InvalidInput(
                    "--quantize applies to safetensors checkpoints; a GGUF file is already quantized (use --dequantize for f32)".into(),
                ));
            }
            let mut src = GgufSource::open(path)?;
            src.dequantize = opts.dequantize;
            src.dtype = if opts.dequantize { dtype } else { DType::F32 };
            let cfg = ModelConfig::from_gguf(&src.content.metadata, path)?;
            let act = if opts.dequantize { dtype } else { quant_act };
            let mut m = Self::build(cfg, &mut src, &opts.device, act, opts.progress.as_ref())?;
            m.info.format = "gguf".into();
            return Ok(m);
        }
        let cfg = ModelConfig::from_hf_dir(path)?;
        if opts.dequantize {
            return Err(ModelError::InvalidInput(
                "--dequantize applies to GGUF files; safetensors weights are not quantized".into(),
            ));
        }
        let ckpt = SafetensorsCheckpoint::open(path)?;
        let Some(q) = opts.quantize else {
            let mut src = HfSource {
                ckpt: &ckpt,
                dtype,
                quantize: None,
            };
            let mut m = Self::build(cfg, &mut src, &opts.device, dtype, opts.progress.as_ref())?;
            m.info.format = "safetensors".into();
            return Ok(m);
        };
        // Quantized safetensors: reuse the GGUF cache when one matches.
        let cache_file = opts.cache_dir.as_ref().map(|d| {
            let key = format!("{}|{}|v1", ckpt.fingerprint(), q.name());
            d.join(format!("{:016x}-{}.gguf", fnv1a(key.as_bytes()), q.name()))
        });
        if let Some(cf) = cache_file.as_ref().filter(|p| p.exists()) {
            match GgufSource::open(cf) {
                Ok(mut src) => {
                    let mut m = Self::build(
                        cfg.clone(),
                        &mut src,
                        &opts.device,
                        quant_act,
                        opts.progress.as_ref(),
                    )?;
                    m.info.format = "gguf-cache".into();
                    m.info.cache_file = Some(cf.clone());
                    m.info.cache_hit = true;
                    return Ok(m);
                }
                Err(e) => {
                    tracing::warn!(cache = %cf.display(), error = %e, "ignoring unreadable quantization cache");
                }
            }
        }
        let mut hf = HfSource {
            ckpt: &ckpt,
            dtype: DType::F32,
            quantize: Some(q),
        };
        let mut rec = Recording {
            inner: &mut hf,
            tensors: Vec::new(),
        };
        let mut m = Self::build(
            cfg,
            &mut rec,
            &opts.device,
            quant_act,
            opts.progress.as_ref(),
        )?;
        m.info.format = "safetensors".into();
        if let Some(cf) = cache_file {
            let res = std::fs::create_dir_all(cf.parent().unwrap_or(Path::new(".")))
                .map_err(|e| ModelError::io(&cf, e))
                .and_then(|_| write_gguf_cache(&cf, &m.cfg, &rec.tensors));
            match res {
                Ok(()) => {
                    tracing::info!(cache = %cf.display(), "wrote quantization cache");
                    m.info.cache_file = Some(cf);
                }
                Err(e) => {
                    tracing::warn!(cache = %cf.display(), error = %e, "cache dir not writable; keeping the quantized model in memory only");
                }
            }
        }
        Ok(m)
    }

    fn build(
        cfg: ModelConfig,
        src: &mut dyn WeightSource,
        device: &Device,
        dtype: DType,
        progress: Option<&ProgressFn>,
    ) -> Result<Self> {
        let t = cfg.text.clone();
        let has_lm_head = src.has_lm_head();
        let total = 2 + LayerWeight::ALL.len() * t.num_hidden_layers + usize::from(has_lm_head);
        let mut info = LoadInfo::default();
        let mut done = 0usize;
        let mut fetch = |name: WeightName, shape: &[usize]| -> Result<Raw> {
            let raw = src.fetch(name, shape, device)?;
            let (ty, bytes) = match &raw {
                Raw::Dense(x) => (
                    format!("{:?}", x.dtype()),
                    x.elem_count() * x.dtype().size_in_bytes(),
                ),
                Raw::Quant(q) => (format!("{:?}", q.dtype()), q.storage_size_in_bytes()),
            };
            *info.tensor_types.entry(ty).or_default() += 1;
            info.weight_bytes += bytes;
            done += 1;
            if let Some(p) = progress {
                p(done, total);
            }
            Ok(raw)
        };
        let eps = t.rms_norm_eps as f32;
        let (h, hd) = (t.hidden_size, t.head_dim);
        let (nh, nkv, ff) = (
            t.num_attention_heads,
            t.num_key_value_heads,
            t.intermediate_size,
        );
        let embed = match fetch(WeightName::Embed, &[t.vocab_size, h])? {
            Raw::Dense(x) => Embedding::Dense(x),
            Raw::Quant(q) => Embedding::Quant(crate::cpu_layout::relayout(q, device)?),
        };
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        for i in 0..t.num_hidden_layers {
            let mut norm = |w: LayerWeight, n: usize| -> Result<RmsNorm> {
                to_norm(fetch(WeightName::Layer(i, w), &[n])?, device, eps)
            };
            let input_norm = norm(LayerWeight::InputNorm, h)?;
            let q_norm = norm(LayerWeight::QNorm, hd)?;
            let k_norm = norm(LayerWeight::KNorm, hd)?;
            let post_attn_norm = norm(LayerWeight::PostAttnNorm, h)?;
            let pre_ff_norm = norm(LayerWeight::PreFfNorm, h)?;
            let post_ff_norm = norm(LayerWeight::PostFfNorm, h)?;
            let mut mat = |w: LayerWeight, out: usize, inp: usize| -> Result<Linear> {
                to_linear(fetch(WeightName::Layer(i, w), &[out, inp])?, device)
            };
            let q = mat(LayerWeight::QProj, nh * hd, h)?;
            let k = mat(LayerWeight::KProj, nkv * hd, h)?;
            let v = mat(LayerWeight::VProj, nkv * hd, h)?;
            let o = mat(LayerWeight::OProj, h, nh * hd)?;
            let gate = mat(LayerWeight::Gate, ff, h)?;
            let up = mat(LayerWeight::Up, ff, h)?;
            let down = mat(LayerWeight::Down, h, ff)?;
            layers.push(Layer {
                input_norm,
                attn: Attention {
                    kind: t.layer_type(i),
                    qkv: Projections::new(vec![q, k, v], vec![nh * hd, nkv * hd, nkv * hd])?,
                    o,
                    q_norm,
                    k_norm,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                    scale: t.attn_scale(),
                },
                post_attn_norm,
                pre_ff_norm,
                mlp: Mlp {
                    gate_up: Projections::new(vec![gate, up], vec![ff, ff])?,
                    down,
                },
                post_ff_norm,
            });
        }
        let final_norm = to_norm(fetch(WeightName::FinalNorm, &[h])?, device, eps)?;
        let lm_head = if has_lm_head {
            to_linear(fetch(WeightName::LmHead, &[t.vocab_size, h])?, device)?
        } else {
            embed.as_linear()?
        };
        let embed_scale = {
            let s = (t.hidden_size as f32).sqrt();
            if dtype == DType::BF16 {
                f64::from(half::bf16::from_f32(s).to_f32())
            } else {
                f64::from(s)
            }
        };
        Ok(Self {
            inv_freq_local: inv_freq(t.head_dim, &t.rope_local),
            inv_freq_global: inv_freq(t.head_dim, &t.rope_global),
            cfg,
            device: device.clone(),
            dtype,
            embed,
            embed_scale,
            layers,
            final_norm,
            lm_head,
            info,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The activation (and KV cache) dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What was loaded.
    pub fn info(&self) -> &LoadInfo {
        &self.info
    }

    /// A fresh KV cache sized for this model.
    pub fn new_kv_cache(&self, cfg: KvCacheConfig) -> KvCache {
        KvCache::new(&self.cfg.text, self.dtype, &self.device, cfg)
    }

    /// Runs new tokens of several sequences through the decoder and returns, per sequence, the
    /// requested logits (`[rows, vocab]`, f32) or `None`.
    pub fn forward(
        &self,
        kv: &mut KvCache,
        batch: &mut [SeqInput<'_>],
    ) -> Result<Vec<Option<Tensor>>> {
        self.forward_impl(kv, batch, None)
    }

    /// Runs one sequence from scratch and returns the logits of every row plus the hidden
    /// states in transformers' `output_hidden_states` convention: index 0 the scaled
    /// embeddings, index i the output of layer i-1, and the last one after the final norm.
    pub fn forward_with_hidden_states(
        &self,
        tokens: &[u32],
        image_embeds: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut kv = self.new_kv_cache(KvCacheConfig::default());
        let mut seq = kv.new_sequence();
        let mut hidden = Vec::new();
        let mut batch = [SeqInput {
            kv: &mut seq,
            tokens,
            image_embeds,
            logits: LogitsRows::All,
        }];
        let mut out = self.forward_impl(&mut kv, &mut batch, Some(&mut hidden))?;
        let logits = out
            .pop()
            .flatten()
            .ok_or_else(|| ModelError::InvalidInput("empty prompt".into()))?;
        kv.release(&mut seq);
        Ok((logits, hidden))
    }

    /// Declares the image tokens of a decoder whose own config has none (a text checkpoint or
    /// GGUF paired with a separately loaded vision tower, as the demo's multimodal pool is).
    /// Image-token ids are then masked before the embedding lookup and their rows take the
    /// spliced embeddings, as for a multimodal checkpoint. Refused when the model already has
    /// a different multimodal config.
    pub fn set_multimodal(&mut self, mm: MultimodalConfig) -> Result<()> {
        if let Some(have) = &self.cfg.multimodal
            && (have.image_token_index != mm.image_token_index
                || have.mm_tokens_per_image != mm.mm_tokens_per_image)
        {
            return Err(ModelError::InvalidInput(format!(
                "the checkpoint's own image config (token {}, {} per image) differs from the \
                 one given (token {}, {} per image)",
                have.image_token_index,
                have.mm_tokens_per_image,
                mm.image_token_index,
                mm.mm_tokens_per_image
            )));
        }
        self.cfg.multimodal = Some(mm);
        Ok(())
    }

    fn image_token(&self) -> Option<u32> {
        self.cfg.multimodal.as_ref().map(|m| m.image_token_index)
    }

    fn validate(&self, item: &SeqInput<'_>) -> Result<usize> {
        let t = &self.cfg.text;
        let n = item.tokens.len();
        let end = item.kv.len() + n;
        if end > t.max_position_embeddings {
            return Err(ModelError::Limit(format!(
                "sequence of {end} tokens exceeds the model's context of {} tokens",
                t.max_position_embeddings
            )));
        }
        let image = self.image_token();
        let mut n_image = 0;
        for &id in item.tokens {
            if Some(id) == image {
                n_image += 1;
            } else if id as usize >= t.vocab_size {
                return Err(ModelError::InvalidInput(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    t.vocab_size
                )));
            }
        }
        let given = match item.image_embeds {
            Some(e) => {
                let (rows, h) = e.dims2()?;
                if h != t.hidden_size {
                    return Err(ModelError::InvalidInput(format!(
                        "image embeddings have width {h}, the decoder's hidden size is {}",
                        t.hidden_size
                    )));
                }
                rows
            }
            None => 0,
        };
        if given != n_image {
            return Err(ModelError::InvalidInput(format!(
                "{n_image} image tokens in the input but {given} image embedding rows given"
            )));
        }
        Ok(n_image)
    }

    fn rope_tables(&self, positions: &[usize], inv: &[f32]) -> Result<(Tensor, Tensor)> {
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = p as f32;
            for &f in inv {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    fn forward_impl(
        &self,
        kv: &mut KvCache,
        batch: &mut [SeqInput<'_>],
        mut hidden_out: Option<&mut Vec<Tensor>>,
    ) -> Result<Vec<Option<Tensor>>> {
        for item in batch.iter() {
            self.validate(item)?;
        }
        if batch.iter().all(|b| b.tokens.is_empty()) {
            return Ok(batch.iter().map(|_| None).collect());
        }
        for item in batch.iter_mut() {
            kv.reserve(item.kv, item.tokens.len())?;
        }
        let ctx = self.batch_context(kv, batch)?;
        let mut h = self.embed_rows(batch, ctx.total)?;
        if let Some(out) = hidden_out.as_deref_mut() {
            out.push(h.clone());
        }
        for (li, layer) in self.layers.iter().enumerate() {
            h = layer.forward(li, &h, &ctx, kv, batch)?;
            if let Some(out) = hidden_out.as_deref_mut() {
                if li + 1 == self.layers.len() {
                    out.push(self.final_norm.forward(&h)?);
                } else {
                    out.push(h.clone());
                }
            }
        }
        for item in batch.iter_mut() {
            kv.commit(item.kv, item.tokens);
        }
        self.logits(&h, &ctx, batch)
    }

    /// The packed rows of every sequence, their RoPE tables and their masks, built once per
    /// forward call (after the KV blocks are reserved, before any are written).
    fn batch_context(&self, kv: &KvCache, batch: &[SeqInput<'_>]) -> Result<Batch> {
        let t = &self.cfg.text;
        let image = self.image_token();
        let mut positions = Vec::new();
        let mut rows = Vec::with_capacity(batch.len());
        let mut all_groups = Vec::with_capacity(batch.len());
        for item in batch {
            let (start, n) = (item.kv.len(), item.tokens.len());
            let groups = image_groups(item.tokens, image);
            let mut masks: [MaskBlocks; 2] = Default::default();
            for kind in [LayerType::Sliding, LayerType::Global] {
                if n > 0 && t.layer_types.contains(&kind) && !kv.is_paged() {
                    masks[kind_index(kind)] = MaskSpec {
                        start,
                        n,
                        first: kv.first_position(item.kv, kind),
                        kind,
                        groups: &groups,
                    }
                    .build(t, &self.device)?;
                }
            }
            rows.push(SeqRows {
                offset: positions.len(),
                n,
                start,
                masks,
            });
            positions.extend(start..start + n);
            all_groups.push(groups);
        }
        let mut paged: [Option<PagedBatch>; 2] = [None, None];
        if kv.is_paged() {
            for kind in [LayerType::Sliding, LayerType::Global] {
                if !t.layer_types.contains(&kind) {
                    continue;
                }
                let plans: Vec<SeqPlan<'_>> = batch
                    .iter()
                    .zip(&rows)
                    .zip(&all_groups)
                    .map(|((item, r), groups)| {
                        let (first, table) = kv.table(item.kv, kind);
                        SeqPlan {
                            offset: r.offset,
                            n: r.n,
                            start: r.start,
                            groups,
                            first,
                            table,
                        }
                    })
                    .collect();
                let window = match kind {
                    LayerType::Sliding => t.sliding_window,
                    LayerType::Global => 0,
                };
                paged[kind_index(kind)] = Some(PagedBatch::build(
                    &plans,
                    window,
                    kv.block_size(),
                    &self.device,
                )?);
            }
        }
        Ok(Batch {
            total: positions.len(),
            rows,
            rope: [
                self.rope_tables(&positions, &self.inv_freq_local)?,
                self.rope_tables(&positions, &self.inv_freq_global)?,
            ],
            paged,
        })
    }

    /// The scaled token embeddings of the packed rows, with image embeddings spliced in at the
    /// image-token rows after the scaling (image ids are looked up as pad, as transformers does).
    fn embed_rows(&self, batch: &[SeqInput<'_>], total: usize) -> Result<Tensor> {
        let image = self.image_token();
        let pad = self.cfg.text.pad_token_id.unwrap_or(0);
        let mut ids = Vec::with_capacity(total);
        let mut source_rows: Vec<u32> = Vec::with_capacity(total);
        let mut image_rows = 0u32;
        let mut image_parts = Vec::new();
        for item in batch {
            for &id in item.tokens {
                if Some(id) == image {
                    ids.push(pad);
                    source_rows.push(total as u32 + image_rows);
                    image_rows += 1;
                } else {
                    source_rows.push(ids.len() as u32);
                    ids.push(id);
                }
            }
            if let Some(e) = item.image_embeds {
                image_parts.push(e.to_dtype(self.dtype)?.to_device(&self.device)?);
            }
        }
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let h = self.embed.lookup(&ids_t)?.to_dtype(self.dtype)?;
        let h = h.affine(self.embed_scale, 0.0)?;
        if image_rows == 0 {
            return Ok(h);
        }
        let mut parts = vec![h];
        parts.extend(image_parts);
        let all = Tensor::cat(&parts, 0)?;
        let idx = Tensor::new(source_rows.as_slice(), &self.device)?;
        Ok(all.index_select(&idx, 0)?)
    }

    /// Logits (after the final norm) for the rows each sequence asked for.
    fn logits(
        &self,
        h: &Tensor,
        ctx: &Batch,
        batch: &[SeqInput<'_>],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for (r, item) in ctx.rows.iter().zip(batch) {
            let (o, n) = (r.offset, r.n);
            let before = rows.len();
            match item.logits {
                LogitsRows::None => {}
                LogitsRows::Last if n > 0 => rows.push((o + n - 1) as u32),
                LogitsRows::Last => {}
                LogitsRows::All => rows.extend((o..o + n).map(|r| r as u32)),
            }
            spans.push((before, rows.len() - before));
        }
        if rows.is_empty() {
            return Ok(batch.iter().map(|_| None).collect());
        }
        let idx = Tensor::new(rows.as_slice(), &self.device)?;
        let sel = self.final_norm.forward(&h.index_select(&idx, 0)?)?;
        let logits = self.lm_head.forward(&sel)?.to_dtype(DType::F32)?;
        spans
            .into_iter()
            .map(|(start, len)| {
                Ok((len > 0)
                    .then(|| logits.narrow(0, start, len))
                    .transpose()?)
            })
            .collect()
    }
}

fn to_norm(raw: Raw, device: &Device, eps: f32) -> Result<RmsNorm> {
    let weight = match raw {
        Raw::Dense(x) => x.to_dtype(DType::F32)?,
        Raw::Quant(q) => q.dequantize(device)?,
    };
    Ok(RmsNorm { weight, eps })
}

fn to_linear(raw: Raw, device: &Device) -> Result<Linear> {
    Ok(match raw {
        Raw::Dense(x) => Linear::Dense(x),
        Raw::Quant(q) => {
            let q = crate::cpu_layout::relayout(q, device)?;
            let packed = crate::cpu_gemv::PackedQ8::for_decode(&q)?;
            Linear::Quant(candle_core::quantized::QMatMul::from_arc(q)?, packed)
        }
    })
}

/// A small stable hash for cache file names.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
