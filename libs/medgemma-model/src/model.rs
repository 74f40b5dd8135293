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

#[derive(Debug)]
struct RmsNorm {
    /// 1 + w, f32.
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        candle_nn::ops::rms_norm(&xf.contiguous()?, &self.weight, self.eps)?.to_dtype(dt)
    }
}

/// Projections that share an input, fused into one matmul when their storage allows.
#[derive(Debug)]
enum Projections {
    Fused { w: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>, widths: Vec<usize>) -> Result<Self> {
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

#[derive(Debug)]
struct Layer {
    kind: LayerType,
    input_norm: RmsNorm,
    qkv: Projections,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    pre_ff_norm: RmsNorm,
    gate_up: Projections,
    down: Linear,
    post_ff_norm: RmsNorm,
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
            let act = if opts.dequantize { dtype } else { DType::F32 };
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
                        DType::F32,
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
            DType::F32,
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
            Raw::Quant(q) => {
                let (table, padded) = crate::cpu_layout::relayout(q, device)?;
                Embedding::Quant {
                    table,
                    padded,
                    hidden: h,
                }
            }
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
                kind: t.layer_type(i),
                input_norm,
                qkv: Projections::new(vec![q, k, v], vec![nh * hd, nkv * hd, nkv * hd])?,
                o,
                q_norm,
                k_norm,
                post_attn_norm,
                pre_ff_norm,
                gate_up: Projections::new(vec![gate, up], vec![ff, ff])?,
                down,
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
        let t = &self.cfg.text;
        let mut n_images = Vec::with_capacity(batch.len());
        for item in batch.iter() {
            n_images.push(self.validate(item)?);
        }
        let total: usize = batch.iter().map(|b| b.tokens.len()).sum();
        if total == 0 {
            return Ok(batch.iter().map(|_| None).collect());
        }
        for item in batch.iter_mut() {
            kv.reserve(item.kv, item.tokens.len())?;
        }
        // Packed rows: positions, ids (image ids masked to pad as transformers does) and
        // where each row's embedding comes from.
        let image = self.image_token();
        let pad = t.pad_token_id.unwrap_or(0);
        let mut positions = Vec::with_capacity(total);
        let mut ids = Vec::with_capacity(total);
        let mut source_rows: Vec<u32> = Vec::with_capacity(total);
        let mut image_rows = 0u32;
        let mut image_parts = Vec::new();
        for item in batch.iter() {
            let start = item.kv.len();
            for (i, &id) in item.tokens.iter().enumerate() {
                positions.push(start + i);
                if Some(id) == image {
                    ids.push(pad);
                    source_rows.push(total as u32 + image_rows);
                    image_rows += 1;
                } else {
                    ids.push(id);
                    source_rows.push((positions.len() - 1) as u32);
                }
            }
            if let Some(e) = item.image_embeds {
                image_parts.push(e.to_dtype(self.dtype)?.to_device(&self.device)?);
            }
        }
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let mut h = self.embed.lookup(&ids_t)?.to_dtype(self.dtype)?;
        h = h.affine(self.embed_scale, 0.0)?;
        if image_rows > 0 {
            let mut parts = vec![h];
            parts.extend(image_parts);
            let all = Tensor::cat(&parts, 0)?;
            let idx = Tensor::new(source_rows.as_slice(), &self.device)?;
            h = all.index_select(&idx, 0)?;
        }
        if let Some(out) = hidden_out.as_deref_mut() {
            out.push(h.clone());
        }

        // Masks per sequence and layer kind (shared by every layer of that kind).
        let mut offsets = Vec::with_capacity(batch.len());
        let mut masks: Vec<[Option<Tensor>; 2]> = Vec::with_capacity(batch.len());
        let mut off = 0;
        for item in batch.iter() {
            offsets.push(off);
            off += item.tokens.len();
            let groups = image_groups(item.tokens, image);
            let mut m: [Option<Tensor>; 2] = [None, None];
            for (ki, kind) in [LayerType::Sliding, LayerType::Global]
                .into_iter()
                .enumerate()
            {
                if !t.layer_types.contains(&kind) {
                    continue;
                }
                let first = kv.first_position(item.kv, kind);
                m[ki] = self.mask(item.kv.len(), item.tokens.len(), first, kind, &groups)?;
            }
            masks.push(m);
        }

        let (cos_l, sin_l) = self.rope_tables(&positions, &self.inv_freq_local)?;
        let (cos_g, sin_g) = self.rope_tables(&positions, &self.inv_freq_global)?;
        let (nh, nkv, hd) = (t.num_attention_heads, t.num_key_value_heads, t.head_dim);
        let groups_per_kv = nh / nkv;
        let scale = t.attn_scale();

        for (li, layer) in self.layers.iter().enumerate() {
            let residual = h.clone();
            let x = layer.input_norm.forward(&h)?;
            let qkv = layer.qkv.forward(&x)?;
            let q = qkv[0].contiguous()?.reshape((total, nh, hd))?;
            let k = qkv[1].contiguous()?.reshape((total, nkv, hd))?;
            let v = qkv[2].contiguous()?.reshape((total, nkv, hd))?;
            let q = layer.q_norm.forward(&q)?;
            let k = layer.k_norm.forward(&k)?;
            let (cos, sin) = match layer.kind {
                LayerType::Sliding => (&cos_l, &sin_l),
                LayerType::Global => (&cos_g, &sin_g),
            };
            let q = candle_nn::rotary_emb::rope(
                &q.transpose(0, 1)?.contiguous()?.unsqueeze(0)?,
                cos,
                sin,
            )?
            .squeeze(0)?;
            let k = candle_nn::rotary_emb::rope(
                &k.transpose(0, 1)?.contiguous()?.unsqueeze(0)?,
                cos,
                sin,
            )?
            .squeeze(0)?;
            let v = v.transpose(0, 1)?.contiguous()?;
            let ki = match layer.kind {
                LayerType::Sliding => 0,
                LayerType::Global => 1,
            };
            let mut outs = Vec::with_capacity(batch.len());
            for (bi, item) in batch.iter().enumerate() {
                let n = item.tokens.len();
                if n == 0 {
                    continue;
                }
                let o = offsets[bi];
                kv.write(item.kv, li, &k.narrow(1, o, n)?, &v.narrow(1, o, n)?)?;
                let end = item.kv.len() + n;
                let (kk, vv, _first) = kv.gather(item.kv, li, end)?;
                let l = kk.dim(1)?;
                let qi = q
                    .narrow(1, o, n)?
                    .contiguous()?
                    .reshape((nkv, groups_per_kv * n, hd))?;
                let scores = (qi.matmul(&kk.t()?)? * scale)?;
                let scores = scores
                    .to_dtype(DType::F32)?
                    .reshape((nkv, groups_per_kv, n, l))?;
                let scores = match &masks[bi][ki] {
                    Some(m) => scores.broadcast_add(m)?,
                    None => scores,
                };
                let probs = candle_nn::ops::softmax_last_dim(&scores)?
                    .to_dtype(self.dtype)?
                    .reshape((nkv, groups_per_kv * n, l))?;
                let out = probs.matmul(&vv)?.reshape((nh, n, hd))?;
                outs.push(out);
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one output")
            } else {
                Tensor::cat(&outs, 1)?
            };
            let attn = attn
                .transpose(0, 1)?
                .contiguous()?
                .reshape((total, nh * hd))?;
            let attn = layer.o.forward(&attn)?;
            h = (residual + layer.post_attn_norm.forward(&attn)?)?;
            let residual = h.clone();
            let x = layer.pre_ff_norm.forward(&h)?;
            let gu = layer.gate_up.forward(&x)?;
            let mlp = layer.down.forward(&(gu[0].gelu()? * &gu[1])?)?;
            h = (residual + layer.post_ff_norm.forward(&mlp)?)?;
            if let Some(out) = hidden_out.as_deref_mut() {
                if li + 1 == self.layers.len() {
                    out.push(self.final_norm.forward(&h)?);
                } else {
                    out.push(h.clone());
                }
            }
        }
        for item in batch.iter_mut() {
            let n = item.tokens.len();
            kv.commit(item.kv, n);
        }

        // Logits only for the rows that are needed.
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for (bi, item) in batch.iter().enumerate() {
            let n = item.tokens.len();
            let o = offsets[bi];
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
        let sel = h.index_select(&idx, 0)?;
        let sel = self.final_norm.forward(&sel)?;
        let logits = self.lm_head.forward(&sel)?.to_dtype(DType::F32)?;
        spans
            .into_iter()
            .map(|(start, len)| {
                if len == 0 {
                    Ok(None)
                } else {
                    Ok(Some(logits.narrow(0, start, len)?))
                }
            })
            .collect()
    }

    /// The additive mask `[n, L]` for one sequence's new rows against its cached keys, or
    /// `None` when every key is visible.
    fn mask(
        &self,
        start: usize,
        n: usize,
        first: usize,
        kind: LayerType,
        groups: &[Option<u32>],
    ) -> Result<Option<Tensor>> {
        let l = start + n - first;
        let w = self.cfg.text.sliding_window;
        let visible = |q: usize, k: usize| -> bool {
            let same_image = k >= start
                && matches!((groups[q - start], groups[k - start]), (Some(a), Some(b)) if a == b);
            let causal_or_image = k <= q || same_image;
            match kind {
                LayerType::Global => causal_or_image,
                LayerType::Sliding => q < k + w && causal_or_image,
            }
        };
        let mut all = true;
        let mut data = Vec::with_capacity(n * l);
        for qi in 0..n {
            let q = start + qi;
            for kj in 0..l {
                let ok = visible(q, first + kj);
                all &= ok;
                data.push(if ok { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        if all {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(data, (n, l), &self.device)?))
    }
}

/// Runs of consecutive image tokens, numbered; `None` for text rows.
fn image_groups(tokens: &[u32], image: Option<u32>) -> Vec<Option<u32>> {
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
            let (q, kp) = crate::cpu_layout::relayout(q, device)?;
            let packed = crate::cpu_gemv::PackedQ8::for_decode(&q, kp)?;
            Linear::Quant(candle_core::quantized::QMatMul::from_arc(q)?, kp, packed)
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
