//! [`VisionEncoder`]: image bytes -> soft-token embeddings for the Gemma 3 decoder.
//!
//! Decode ([`crate::decode_image`]), preprocess ([`crate::to_pixel_values`]), SigLIP tower,
//! projector. Loads the tower and projector from a MedGemma 4B / Gemma 3 multimodal checkpoint
//! directory (legacy `vision_tower.vision_model.*` + `multi_modal_projector.*`, or the
//! transformers-5 `model.vision_tower.*` + `model.multi_modal_projector.*` names), or builds a
//! seeded random tower in the real layout for the demo (said plainly: its embeddings carry no
//! meaning).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use medgemma_model::SafetensorsCheckpoint;
use serde_json::Value;

use crate::decode::{DecodeOptions, decode_image};
use crate::error::{Result, VisionError};
use crate::preprocess::{PreprocessConfig, to_pixel_values};
use crate::siglip::{Projector, SiglipConfig, SiglipTower, TensorSource, random_tensor};

/// The demo tower's shape (`libs/medgemma-vision/demo/vision_config.json`).
const DEMO_CONFIG: &str = include_str!("../demo/vision_config.json");

/// Everything the vision path needs from a multimodal config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionModelConfig {
    pub vision: SiglipConfig,
    /// Soft tokens per image (256 for MedGemma 4B).
    pub mm_tokens_per_image: usize,
    /// Width of the decoder the embeddings feed (2560 for MedGemma 4B).
    pub text_hidden_size: usize,
    pub image_token_index: u32,
    pub boi_token_index: u32,
    pub eoi_token_index: u32,
}

fn u32_or(v: &Value, key: &str, default: u32) -> u32 {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|n| n as u32)
        .unwrap_or(default)
}

impl VisionModelConfig {
    /// Reads `config.json` of a Gemma 3 multimodal checkpoint.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| VisionError::Config(format!("cannot read {}: {e}", path.display())))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| VisionError::Config(format!("{} is not JSON: {e}", path.display())))?;
        Self::from_hf_json(&v)
    }

    /// From the parsed `config.json` (it must have a `vision_config`).
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let vc = v.get("vision_config").ok_or_else(|| {
            VisionError::Config(
                "config.json has no vision_config: this is a text-only checkpoint".into(),
            )
        })?;
        let text_hidden = v
            .get("text_config")
            .and_then(|t| t.get("hidden_size"))
            .and_then(Value::as_u64)
            .unwrap_or(2560) as usize;
        let cfg = Self {
            vision: SiglipConfig::from_json(vc)?,
            mm_tokens_per_image: v
                .get("mm_tokens_per_image")
                .and_then(Value::as_u64)
                .unwrap_or(256) as usize,
            text_hidden_size: text_hidden,
            image_token_index: u32_or(v, "image_token_index", 262_144),
            boi_token_index: u32_or(v, "boi_token_index", 255_999),
            eoi_token_index: u32_or(v, "eoi_token_index", 256_000),
        };
        Projector::kernel_size(&cfg.vision, cfg.mm_tokens_per_image)?;
        Ok(cfg)
    }

    /// The shipped demo tower (small SigLIP, real layout) for a decoder `text_hidden` wide,
    /// with Gemma 3's image token ids.
    pub fn demo(text_hidden: usize) -> Result<Self> {
        let mut v: Value = serde_json::from_str(DEMO_CONFIG)
            .map_err(|e| VisionError::Config(format!("demo vision config: {e}")))?;
        v["text_config"] = serde_json::json!({ "hidden_size": text_hidden });
        Self::from_hf_json(&v)
    }

    /// The decoder-side view: what [`medgemma_model::Gemma3::set_multimodal`] takes.
    pub fn to_model_config(&self) -> medgemma_model::MultimodalConfig {
        medgemma_model::MultimodalConfig {
            boi_token_index: self.boi_token_index,
            eoi_token_index: self.eoi_token_index,
            image_token_index: self.image_token_index,
            mm_tokens_per_image: self.mm_tokens_per_image,
            vision_config: serde_json::json!({
                "hidden_size": self.vision.hidden_size,
                "image_size": self.vision.image_size,
                "patch_size": self.vision.patch_size,
            }),
        }
    }

    /// How images are preprocessed for this tower.
    pub fn preprocess(&self) -> PreprocessConfig {
        PreprocessConfig {
            image_size: self.vision.image_size as u32,
            pan_and_scan: None,
        }
    }
}

/// Which names a checkpoint uses for the tower and projector.
struct CheckpointSource<'a> {
    ck: &'a SafetensorsCheckpoint,
    tower: &'static str,
    projector: &'static str,
    device: &'a Device,
}

impl TensorSource for CheckpointSource<'_> {
    fn get(&self, projector: bool, name: &str) -> Result<Tensor> {
        let prefix = if projector {
            self.projector
        } else {
            self.tower
        };
        self.ck
            .load(&format!("{prefix}{name}"), self.device)
            .map_err(|e| VisionError::Checkpoint(e.to_string()))
    }
}

impl<'a> CheckpointSource<'a> {
    fn new(ck: &'a SafetensorsCheckpoint, device: &'a Device) -> Result<Self> {
        let names: std::collections::HashSet<&str> = ck.tensor_names().collect();
        let probe = "embeddings.patch_embedding.weight";
        let tower = [
            "vision_tower.vision_model.",
            "model.vision_tower.vision_model.",
            "model.vision_tower.",
        ]
        .into_iter()
        .find(|p| names.contains(format!("{p}{probe}").as_str()))
        .ok_or_else(|| {
            VisionError::Checkpoint(
                "no vision tower in this checkpoint (looked for vision_tower.vision_model.*, \
                 model.vision_tower.*): is it a text-only model?"
                    .into(),
            )
        })?;
        let projector = ["multi_modal_projector.", "model.multi_modal_projector."]
            .into_iter()
            .find(|p| names.contains(format!("{p}mm_input_projection_weight").as_str()))
            .ok_or_else(|| {
                VisionError::Checkpoint(
                    "no multi_modal_projector.mm_input_projection_weight in this checkpoint".into(),
                )
            })?;
        Ok(Self {
            ck,
            tower,
            projector,
            device,
        })
    }
}

/// A seeded random tower and projector in the real shapes (the demo's multimodal pool).
struct RandomSource {
    cfg: VisionModelConfig,
    seed: u64,
    device: Device,
}

impl TensorSource for RandomSource {
    fn get(&self, projector: bool, name: &str) -> Result<Tensor> {
        let v = &self.cfg.vision;
        let (h, m) = (v.hidden_size, v.intermediate_size);
        let seed = self.seed ^ fnv1a(name.as_bytes()) ^ u64::from(projector);
        let zeros = |shape: &[usize]| Ok(Tensor::zeros(shape, DType::F32, &self.device)?);
        let ones = |shape: &[usize]| Ok(Tensor::ones(shape, DType::F32, &self.device)?);
        let rand = |shape: &[usize]| random_tensor(shape, 0.02, seed, &self.device);
        if projector {
            return match name {
                "mm_soft_emb_norm.weight" => zeros(&[h]),
                "mm_input_projection_weight" => rand(&[h, self.cfg.text_hidden_size]),
                _ => Err(VisionError::Checkpoint(format!("no demo tensor {name}"))),
            };
        }
        let p = v.patch_size;
        match name {
            "embeddings.patch_embedding.weight" => rand(&[h, v.num_channels, p, p]),
            "embeddings.position_embedding.weight" => rand(&[v.num_patches(), h]),
            n if n.ends_with("layer_norm1.weight")
                || n.ends_with("layer_norm2.weight")
                || n == "post_layernorm.weight" =>
            {
                ones(&[h])
            }
            n if n.ends_with("fc1.weight") => rand(&[m, h]),
            n if n.ends_with("fc1.bias") => zeros(&[m]),
            n if n.ends_with("fc2.weight") => rand(&[h, m]),
            n if n.ends_with(".weight") => rand(&[h, h]),
            n if n.ends_with(".bias") => zeros(&[h]),
            _ => Err(VisionError::Checkpoint(format!("no demo tensor {name}"))),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Image in, soft tokens out.
pub struct VisionEncoder {
    cfg: VisionModelConfig,
    tower: SiglipTower,
    projector: Projector,
    device: Device,
    random: bool,
}

impl std::fmt::Debug for VisionEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionEncoder")
            .field("cfg", &self.cfg)
            .field("random", &self.random)
            .finish()
    }
}

impl VisionEncoder {
    /// Loads the tower and projector of the multimodal checkpoint in `dir`, in `dtype`
    /// (f32 or bf16; f16 is refused as for the decoder).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        check_dtype(dtype)?;
        let cfg = VisionModelConfig::from_hf_dir(dir)?;
        let ck =
            SafetensorsCheckpoint::open(dir).map_err(|e| VisionError::Checkpoint(e.to_string()))?;
        let src = CheckpointSource::new(&ck, device)?;
        Self::build(cfg, &src, device, dtype, false)
    }

    /// A tower of any configuration with seeded random weights (the GPU benchmark's
    /// full-size SigLIP); its embeddings are meaningless.
    pub fn random(
        cfg: VisionModelConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        check_dtype(dtype)?;
        let src = RandomSource {
            cfg: cfg.clone(),
            seed,
            device: device.clone(),
        };
        Self::build(cfg, &src, device, dtype, true)
    }

    /// The demo tower: [`VisionModelConfig::demo`] with seeded random weights. Its
    /// embeddings are deterministic and meaningless.
    pub fn demo(text_hidden: usize, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        check_dtype(dtype)?;
        let cfg = VisionModelConfig::demo(text_hidden)?;
        let src = RandomSource {
            cfg: cfg.clone(),
            seed,
            device: device.clone(),
        };
        Self::build(cfg, &src, device, dtype, true)
    }

    fn build(
        cfg: VisionModelConfig,
        src: &dyn TensorSource,
        device: &Device,
        dtype: DType,
        random: bool,
    ) -> Result<Self> {
        let tower = SiglipTower::load(&cfg.vision, src, dtype)?;
        let projector = Projector::load(
            &cfg.vision,
            cfg.mm_tokens_per_image,
            cfg.text_hidden_size,
            src,
            dtype,
        )?;
        Ok(Self {
            cfg,
            tower,
            projector,
            device: device.clone(),
            random,
        })
    }

    pub fn config(&self) -> &VisionModelConfig {
        &self.cfg
    }

    /// Whether the weights are the seeded random demo tower.
    pub fn is_random(&self) -> bool {
        self.random
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes held by the tower's and projector's weights.
    pub fn weight_bytes(&self) -> usize {
        self.tower.weight_bytes() + self.projector.weight_bytes()
    }

    /// The tower's last hidden state for `pixel_values` `[b, 3, size, size]`.
    pub fn tower_output(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.tower.forward(&pixel_values.to_device(&self.device)?)
    }

    /// Soft-token embeddings `[b, mm_tokens_per_image, text_hidden]` for `pixel_values`.
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.projector.forward(&self.tower_output(pixel_values)?)
    }

    /// One decoded image -> `[mm_tokens_per_image, text_hidden]`.
    pub fn encode_image(&self, img: &image::RgbImage) -> Result<Tensor> {
        let pv = to_pixel_values(img, self.cfg.vision.image_size as u32)?.unsqueeze(0)?;
        Ok(self.encode_pixels(&pv)?.squeeze(0)?)
    }

    /// Encoded bytes (PNG, JPEG, WebP, TIFF, DICOM) -> `[mm_tokens_per_image, text_hidden]`.
    pub fn encode_bytes(&self, bytes: &[u8], opts: &DecodeOptions) -> Result<Tensor> {
        let img = decode_image(bytes, opts)?;
        self.encode_image(&img)
    }

    /// Encoded bytes -> pixel values `[3, image_size, image_size]` (decode, resize, normalise).
    pub fn pixel_values(&self, bytes: &[u8], opts: &DecodeOptions) -> Result<Tensor> {
        let img = decode_image(bytes, opts)?;
        to_pixel_values(&img, self.cfg.vision.image_size as u32)
    }

    /// Several images with one tower and projector forward: each is decoded and preprocessed
    /// on its own, one after the other (one decoded image in memory at a time), then the pixel
    /// values of those that decoded are stacked into `[n, 3, size, size]` and encoded at once
    /// ([`SiglipTower::forward`] packs their rows). The embeddings equal [`Self::encode_bytes`]'s
    /// for each image alone.
    ///
    /// One result per input, in order: `Ok([mm_tokens_per_image, text_hidden])`, or that image's
    /// own decoding error, which leaves the others untouched. The outer error is a failure of the
    /// batched forward itself, which no image can be singled out for.
    pub fn encode_bytes_batch(
        &self,
        images: &[(&[u8], DecodeOptions)],
    ) -> Result<Vec<Result<Tensor>>> {
        let mut out: Vec<Result<Tensor>> = Vec::with_capacity(images.len());
        let mut decoded = Vec::with_capacity(images.len());
        let decoding = tracing::info_span!("image_decode", medgemma.image_count = images.len());
        let decoding = decoding.enter();
        for (bytes, opts) in images {
            match self.pixel_values(bytes, opts) {
                Ok(pv) => {
                    decoded.push(pv);
                    // A placeholder, replaced by this image's row of the batch below.
                    out.push(Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        drop(decoding);
        if decoded.is_empty() {
            return Ok(out);
        }
        let embeddings = tracing::info_span!("tower_forward", medgemma.image_count = decoded.len())
            .in_scope(|| self.encode_pixels(&Tensor::stack(&decoded, 0)?))?;
        for (row, slot) in out.iter_mut().filter(|r| r.is_ok()).enumerate() {
            *slot = Ok(embeddings.get(row)?);
        }
        Ok(out)
    }
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => Err(VisionError::InvalidArgument(format!(
            "vision dtype {other:?} is not supported (f32 or bf16; Gemma 3 overflows in f16)"
        ))),
    }
}
