//! Where the decoder's weights come from: Hugging Face safetensors checkpoints (single or
//! sharded, memory-mapped, in every Gemma 3 layout) or GGUF files, optionally quantized at load.
//!
//! Both sources answer the same logical questions ("layer 3's q_proj", "the final norm"), so
//! the decoder never sees file formats. Norm weights are returned as `1 + w` in f32: HF stores
//! `w`, GGUF (llama.cpp's converter) stores `1 + w` already.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::cpu_gemv::PackedQ8;
use crate::error::{ModelError, Result};

/// Quantization applied to safetensors weights at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// 8-bit, blocks of 32 (any dims divisible by 32).
    Q8_0,
    /// 4-bit k-quant, super-blocks of 256 (the 27B-on-one-24GB-GPU option).
    Q4K,
}

impl Quantize {
    /// The GGML type used for the linear layers.
    pub fn linear_dtype(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// The GGML type used for the token embedding (also the tied output head): llama.cpp's
    /// Q4_K_M keeps it at 6 bits, since it dominates output quality.
    pub fn embedding_dtype(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q6K,
        }
    }

    /// The type a tensor with rows of `row_len` elements actually gets: the intended type when
    /// the row length is a multiple of its block size, else Q8_0, else f32.
    pub fn effective(intended: GgmlDType, row_len: usize) -> GgmlDType {
        if row_len.is_multiple_of(intended.block_size()) {
            intended
        } else if row_len.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    }

    /// Name used in cache files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4k",
        }
    }
}

impl std::str::FromStr for Quantize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4k" | "q4_k" | "q4_k_m" => Ok(Self::Q4K),
            other => Err(format!(
                "unknown quantization {other:?} (expected q8_0 or q4k)"
            )),
        }
    }
}

/// A weight matrix `[out, in]`, dense or quantized.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Dense(Tensor),
    /// A quantized matrix and our CPU kernel's copy of it (Q8_0 that candle's fast kernels do
    /// not take; see `cpu_gemv`).
    Quant(QMatMul, Option<Arc<PackedQ8>>),
}

impl Linear {
    /// `x [n, in] -> [n, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Quant(q, packed) => {
                let dt = x.dtype();
                if let Some(p) = packed
                    && let Some(y) = crate::cpu_gemv::forward(p, x)?
                {
                    return y.to_dtype(dt);
                }
                q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dt)
            }
        }
    }
}

/// Stacks matrices with the same input along their output rows, so one matmul computes them
/// all (q/k/v, gate/up): fewer, larger kernels. `None` when their storage differs.
pub(crate) fn fuse(parts: &[Linear]) -> Result<Option<Linear>> {
    match parts {
        [] => Ok(None),
        [Linear::Dense(first), ..] => {
            let mut ts = Vec::with_capacity(parts.len());
            for p in parts {
                match p {
                    Linear::Dense(t) if t.dtype() == first.dtype() => ts.push(t.clone()),
                    _ => return Ok(None),
                }
            }
            Ok(Some(Linear::Dense(Tensor::cat(&ts, 0)?)))
        }
        [Linear::Quant(QMatMul::QTensor(first), first_packed), ..] => {
            let (dt, k) = (first.dtype(), first.shape().dims2()?.1);
            let mut bytes = Vec::new();
            let mut rows = 0;
            for p in parts {
                match p {
                    Linear::Quant(QMatMul::QTensor(q), _)
                        if q.dtype() == dt && q.shape().dims2()?.1 == k =>
                    {
                        bytes.extend_from_slice(&q.data()?);
                        rows += q.shape().dims2()?.0;
                    }
                    _ => return Ok(None),
                }
            }
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(bytes),
                &first.device(),
                dt,
            )?;
            let q = QTensor::new(storage, (rows, k))?;
            let packed = match first_packed {
                Some(_) => PackedQ8::for_decode(&q)?,
                None => None,
            };
            Ok(Some(Linear::Quant(QMatMul::from_arc(Arc::new(q))?, packed)))
        }
        [Linear::Quant(..), ..] => Ok(None),
    }
}

/// The token embedding: dense rows or a quantized table looked up row by row.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    Dense(Tensor),
    /// A quantized table `[vocab, hidden]`.
    Quant(Arc<QTensor>),
}

impl Embedding {
    pub(crate) fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.index_select(ids, 0),
            Self::Quant(table) => table.embedding(ids),
        }
    }

    /// The tied output head over the same storage.
    pub(crate) fn as_linear(&self) -> candle_core::Result<Linear> {
        Ok(match self {
            Self::Dense(w) => Linear::Dense(w.clone()),
            Self::Quant(table) => Linear::Quant(
                QMatMul::from_arc(table.clone())?,
                PackedQ8::for_decode(table)?,
            ),
        })
    }
}

/// Logical weight names of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LayerWeight {
    InputNorm,
    QProj,
    KProj,
    VProj,
    OProj,
    QNorm,
    KNorm,
    PostAttnNorm,
    PreFfNorm,
    Gate,
    Up,
    Down,
    PostFfNorm,
}

impl LayerWeight {
    pub(crate) const ALL: [LayerWeight; 13] = [
        Self::InputNorm,
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::QNorm,
        Self::KNorm,
        Self::PostAttnNorm,
        Self::PreFfNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
        Self::PostFfNorm,
    ];

    fn hf(self) -> &'static str {
        match self {
            Self::InputNorm => "input_layernorm",
            Self::QProj => "self_attn.q_proj",
            Self::KProj => "self_attn.k_proj",
            Self::VProj => "self_attn.v_proj",
            Self::OProj => "self_attn.o_proj",
            Self::QNorm => "self_attn.q_norm",
            Self::KNorm => "self_attn.k_norm",
            Self::PostAttnNorm => "post_attention_layernorm",
            Self::PreFfNorm => "pre_feedforward_layernorm",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
            Self::PostFfNorm => "post_feedforward_layernorm",
        }
    }

    pub(crate) fn gguf(self) -> &'static str {
        match self {
            Self::InputNorm => "attn_norm",
            Self::QProj => "attn_q",
            Self::KProj => "attn_k",
            Self::VProj => "attn_v",
            Self::OProj => "attn_output",
            Self::QNorm => "attn_q_norm",
            Self::KNorm => "attn_k_norm",
            Self::PostAttnNorm => "post_attention_norm",
            Self::PreFfNorm => "ffn_norm",
            Self::Gate => "ffn_gate",
            Self::Up => "ffn_up",
            Self::Down => "ffn_down",
            Self::PostFfNorm => "post_ffw_norm",
        }
    }

    pub(crate) fn is_norm(self) -> bool {
        matches!(
            self,
            Self::InputNorm
                | Self::QNorm
                | Self::KNorm
                | Self::PostAttnNorm
                | Self::PreFfNorm
                | Self::PostFfNorm
        )
    }
}

/// A logical tensor of the text decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WeightName {
    Embed,
    FinalNorm,
    LmHead,
    Layer(usize, LayerWeight),
}

impl WeightName {
    pub(crate) fn gguf(self) -> String {
        match self {
            Self::Embed => "token_embd.weight".into(),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::Layer(i, w) => format!("blk.{i}.{}.weight", w.gguf()),
        }
    }

    pub(crate) fn is_norm(self) -> bool {
        match self {
            Self::FinalNorm => true,
            Self::Layer(_, w) => w.is_norm(),
            Self::Embed | Self::LmHead => false,
        }
    }
}

/// A raw tensor fetched from a source, before the decoder decides how to hold it.
pub(crate) enum Raw {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

/// A checkpoint that can hand out the decoder's tensors.
pub(crate) trait WeightSource {
    /// Fetches a tensor, checking its shape (`[out, in]` for matrices, `[n]` for norms).
    fn fetch(&mut self, name: WeightName, shape: &[usize], device: &Device) -> Result<Raw>;
    /// Whether an untied output head exists.
    fn has_lm_head(&self) -> bool;
}

/// Which of the known Hugging Face layouts a safetensors checkpoint uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfLayout {
    /// `model.*` (Gemma3ForCausalLM, e.g. medgemma-27b-text-it).
    TextOnly,
    /// `language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`
    /// (the hub's original multimodal checkpoints).
    LegacyMultimodal,
    /// `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
    /// optional `lm_head.weight` (transformers >= 4.52 / v5).
    Multimodal,
    /// Only a vision tower and projector (a vision-pool checkpoint): the vision crate reads
    /// it; loading a decoder from it fails on the missing `embed_tokens`.
    VisionOnly,
}

/// A Hugging Face checkpoint directory: one or more memory-mapped safetensors files.
pub struct SafetensorsCheckpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, candle_core::safetensors::MmapedSafetensors)>,
    routing: HashMap<String, usize>,
    layout: HfLayout,
}

impl std::fmt::Debug for SafetensorsCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsCheckpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("layout", &self.layout)
            .finish()
    }
}

impl SafetensorsCheckpoint {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.exists() {
            let bytes = std::fs::read(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| ModelError::checkpoint(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ModelError::checkpoint(&index, "has no weight_map object".to_string())
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(ModelError::checkpoint(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ));
            }
            vec![single]
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            if !p.exists() {
                return Err(ModelError::checkpoint(
                    &p,
                    "listed in model.safetensors.index.json but missing",
                ));
            }
            let st = open_mmap(&p)?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((p, st));
        }
        let layout = if routing.contains_key("model.embed_tokens.weight") {
            HfLayout::TextOnly
        } else if routing.contains_key("language_model.model.embed_tokens.weight") {
            HfLayout::LegacyMultimodal
        } else if routing.contains_key("model.language_model.embed_tokens.weight") {
            HfLayout::Multimodal
        } else if routing
            .keys()
            .any(|k| k.starts_with("vision_tower.") || k.starts_with("model.vision_tower."))
        {
            HfLayout::VisionOnly
        } else {
            return Err(ModelError::MissingTensor {
                name: "embed_tokens.weight (under model., language_model.model. or model.language_model.)".into(),
                path: dir.to_path_buf(),
            });
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            routing,
            layout,
        })
    }

    /// The detected layout.
    pub fn layout(&self) -> &HfLayout {
        &self.layout
    }

    /// Names of every tensor in the checkpoint.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    /// Loads any tensor by its full name (the vision crate uses this for the tower).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let &i = self
            .routing
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                path: self.dir.clone(),
            })?;
        let (path, st) = &self.files[i];
        st.load(name, device)
            .map_err(|e| ModelError::checkpoint(path, format!("tensor {name}: {e}")))
    }

    fn text_prefix(&self) -> &'static str {
        match self.layout {
            HfLayout::TextOnly => "model.",
            HfLayout::LegacyMultimodal | HfLayout::VisionOnly => "language_model.model.",
            HfLayout::Multimodal => "model.language_model.",
        }
    }

    fn lm_head_name(&self) -> &'static str {
        match self.layout {
            HfLayout::TextOnly | HfLayout::Multimodal => "lm_head.weight",
            HfLayout::LegacyMultimodal | HfLayout::VisionOnly => "language_model.lm_head.weight",
        }
    }

    fn hf_name(&self, name: WeightName) -> String {
        let p = self.text_prefix();
        match name {
            WeightName::Embed => format!("{p}embed_tokens.weight"),
            WeightName::FinalNorm => format!("{p}norm.weight"),
            WeightName::LmHead => self.lm_head_name().to_string(),
            WeightName::Layer(i, w) => format!("{p}layers.{i}.{}.weight", w.hf()),
        }
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.routing
            .get(name)
            .map(|&i| self.files[i].0.clone())
            .unwrap_or_else(|| self.dir.clone())
    }

    /// Total size of the weight files, and their newest modification time (cache key).
    pub(crate) fn fingerprint(&self) -> String {
        let mut parts = Vec::new();
        for (p, _) in &self.files {
            let md = std::fs::metadata(p).ok();
            let len = md.as_ref().map(|m| m.len()).unwrap_or(0);
            let mtime = md
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
            parts.push(format!("{}:{len}:{mtime}", canon.display()));
        }
        parts.join("|")
    }
}

#[allow(unsafe_code)]
fn open_mmap(p: &Path) -> Result<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: the file is mapped read-only; like every mmap-based loader (candle, vLLM,
    // transformers) we rely on weight files not being modified while the server runs.
    unsafe { candle_core::safetensors::MmapedSafetensors::new(p) }
        .map_err(|e| ModelError::checkpoint(p, format!("not a readable safetensors file: {e}")))
}

/// A safetensors checkpoint as a [`WeightSource`], converting to the run dtype and optionally
/// quantizing the matrices.
pub(crate) struct HfSource<'a> {
    pub(crate) ckpt: &'a SafetensorsCheckpoint,
    pub(crate) dtype: DType,
    pub(crate) quantize: Option<Quantize>,
}

impl WeightSource for HfSource<'_> {
    fn fetch(&mut self, name: WeightName, shape: &[usize], device: &Device) -> Result<Raw> {
        let full = self.ckpt.hf_name(name);
        let path = self.ckpt.file_of(&full);
        let t = self.ckpt.load(&full, &Device::Cpu)?;
        if t.dims() != shape {
            return Err(ModelError::TensorShape {
                name: full,
                path,
                found: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        if name.is_norm() {
            // HF stores w; the decoder multiplies by (1 + w) in f32.
            let t = (t.to_dtype(DType::F32)? + 1.0)?;
            return Ok(Raw::Dense(t.to_device(device)?));
        }
        if let Some(q) = self.quantize {
            let intended = match name {
                WeightName::Embed | WeightName::LmHead => q.embedding_dtype(),
                WeightName::FinalNorm | WeightName::Layer(..) => q.linear_dtype(),
            };
            let dt = Quantize::effective(intended, shape[shape.len() - 1]);
            if dt != intended {
                tracing::warn!(tensor = %full, ?intended, actual = ?dt, "row length does not fit the block size; using a wider type");
            }
            let f = t.to_dtype(DType::F32)?;
            let qt = QTensor::quantize(&f, dt)?;
            return Ok(Raw::Quant(Arc::new(qt)));
        }
        Ok(Raw::Dense(t.to_dtype(self.dtype)?.to_device(device)?))
    }

    fn has_lm_head(&self) -> bool {
        self.ckpt.routing.contains_key(self.ckpt.lm_head_name())
    }
}

/// A GGUF file as a [`WeightSource`].
pub(crate) struct GgufSource {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) content: gguf_file::Content,
    pub(crate) dequantize: bool,
    pub(crate) dtype: DType,
}

impl GgufSource {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| ModelError::checkpoint(path, format!("not a readable GGUF file: {e}")))?;
        // Check that every tensor's data lies inside the file (a truncated download otherwise
        // surfaces as an obscure read error deep in loading).
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            let bytes = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > len {
                return Err(ModelError::checkpoint(
                    path,
                    format!(
                        "truncated: tensor {name} ends at byte {end} but the file has {len} bytes"
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            dequantize: false,
            dtype: DType::F32,
        })
    }
}

impl WeightSource for GgufSource {
    fn fetch(&mut self, name: WeightName, shape: &[usize], device: &Device) -> Result<Raw> {
        let gname = name.gguf();
        let Some(info) = self.content.tensor_infos.get(&gname) else {
            return Err(ModelError::MissingTensor {
                name: gname,
                path: self.path.clone(),
            });
        };
        if info.shape.dims() != shape {
            return Err(ModelError::TensorShape {
                name: gname,
                path: self.path.clone(),
                found: info.shape.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let qt = self
            .content
            .tensor(&mut self.file, &gname, device)
            .map_err(|e| ModelError::checkpoint(&self.path, format!("tensor {gname}: {e}")))?;
        let is_float = matches!(
            qt.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        if name.is_norm() {
            // llama.cpp's converter already stored 1 + w.
            return Ok(Raw::Dense(qt.dequantize(device)?.to_dtype(DType::F32)?));
        }
        if self.dequantize || is_float {
            return Ok(Raw::Dense(qt.dequantize(device)?.to_dtype(self.dtype)?));
        }
        Ok(Raw::Quant(Arc::new(qt)))
    }

    fn has_lm_head(&self) -> bool {
        self.content.tensor_infos.contains_key("output.weight")
    }
}

/// Writes a quantized model as a GGUF file (llama.cpp tensor names, gemma3 metadata, norms
/// stored as 1 + w like llama.cpp), plus our full text config so it reloads exactly.
pub(crate) fn write_gguf_cache(
    path: &Path,
    cfg: &ModelConfig,
    tensors: &[(String, Arc<QTensor>)],
) -> Result<()> {
    use gguf_file::Value as V;
    let t = &cfg.text;
    let text_json = t.to_hf_json().to_string();
    let md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("gemma3".into())),
        (
            "general.file_type_note".into(),
            V::String("medgemma-serve quantization cache".into()),
        ),
        (
            "gemma3.context_length".into(),
            V::U32(t.max_position_embeddings as u32),
        ),
        (
            "gemma3.embedding_length".into(),
            V::U32(t.hidden_size as u32),
        ),
        (
            "gemma3.block_count".into(),
            V::U32(t.num_hidden_layers as u32),
        ),
        (
            "gemma3.feed_forward_length".into(),
            V::U32(t.intermediate_size as u32),
        ),
        (
            "gemma3.attention.head_count".into(),
            V::U32(t.num_attention_heads as u32),
        ),
        (
            "gemma3.attention.head_count_kv".into(),
            V::U32(t.num_key_value_heads as u32),
        ),
        (
            "gemma3.attention.key_length".into(),
            V::U32(t.head_dim as u32),
        ),
        (
            "gemma3.attention.value_length".into(),
            V::U32(t.head_dim as u32),
        ),
        (
            "gemma3.attention.layer_norm_rms_epsilon".into(),
            V::F32(t.rms_norm_eps as f32),
        ),
        (
            "gemma3.attention.sliding_window".into(),
            V::U32(t.sliding_window as u32),
        ),
        (
            "gemma3.rope.freq_base".into(),
            V::F32(t.rope_global.theta as f32),
        ),
        ("medgemma.text_config".into(), V::String(text_json)),
    ];
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_ref()))
        .collect();
    let tmp = path.with_extension("gguf.partial");
    let mut f = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    gguf_file::write(&mut f, &md_refs, &t_refs)
        .map_err(|e| ModelError::checkpoint(&tmp, format!("writing GGUF cache: {e}")))?;
    f.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
    Ok(())
}
