//! The command line of `medgemma-vision`; every flag also reads a `MEDGEMMA_*` variable.

use std::path::PathBuf;

use candle_core::{DType, Device};
use medgemma_model::DeviceSpec;
use medgemma_vision::VisionEncoder;

use crate::error::VisionServiceError;
use crate::service::{EmbeddingDType, VisionService, VisionSettings};

/// Flags of `medgemma-vision`.
#[derive(Debug, Clone, clap::Args)]
pub struct VisionArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(
        long,
        env = "MEDGEMMA_VISION_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    pub listen: String,
    /// A MedGemma 4B / Gemma 3 multimodal checkpoint directory (its vision tower and projector
    /// are loaded). Without it the seeded random demo tower is used.
    #[arg(long, env = "MEDGEMMA_VISION_MODEL")]
    pub model: Option<PathBuf>,
    /// The demo tower's output width: the hidden size of the decoder it feeds (640 for the
    /// gemma-3-270m demo decoder).
    #[arg(long, env = "MEDGEMMA_DEMO_TEXT_HIDDEN", default_value_t = 640)]
    pub demo_text_hidden: usize,
    /// Seed of the demo tower's random weights.
    #[arg(long, env = "MEDGEMMA_DEMO_VISION_SEED", default_value_t = 0)]
    pub demo_seed: u64,
    /// The model id reported in responses (default: the checkpoint's directory name, or
    /// `demo-siglip-random`).
    #[arg(long, env = "MEDGEMMA_VISION_MODEL_ID")]
    pub model_id: Option<String>,
    /// f32 or bf16 (default: f32 on cpu, bf16 on cuda). f16 is refused for Gemma 3.
    #[arg(long, env = "MEDGEMMA_DTYPE")]
    pub dtype: Option<String>,
    /// cpu, or cuda / cuda:N (needs a build with the `cuda` feature).
    #[arg(long, env = "MEDGEMMA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// The element type of returned embeddings.
    #[arg(
        long,
        env = "MEDGEMMA_EMBEDDING_DTYPE",
        value_enum,
        default_value = "f32"
    )]
    pub embedding_dtype: EmbeddingDType,
    /// The largest image a request may carry, in bytes.
    #[arg(long, env = "MEDGEMMA_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    /// The largest decoded image, in pixels (decompression-bomb guard).
    #[arg(long, env = "MEDGEMMA_MAX_IMAGE_PIXELS", default_value_t = medgemma_vision::decode::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// The deepest nesting of DICOM sequences accepted, checked before the object is parsed
    /// (deeper: INVALID_ARGUMENT).
    #[arg(long, env = "MEDGEMMA_MAX_DICOM_DEPTH", default_value_t = medgemma_vision::decode::DEFAULT_MAX_DICOM_DEPTH)]
    pub max_dicom_depth: u32,
    /// The most DICOM elements (items and delimiters included) accepted, checked before the
    /// object is parsed (more: INVALID_ARGUMENT).
    #[arg(long, env = "MEDGEMMA_MAX_DICOM_ELEMENTS", default_value_t = medgemma_vision::decode::DEFAULT_MAX_DICOM_ELEMENTS)]
    pub max_dicom_elements: u64,
    /// The most images in one request.
    #[arg(long, env = "MEDGEMMA_MAX_IMAGES_PER_REQUEST", default_value_t = 8)]
    pub max_images: usize,
    /// Requests that may wait for the encoder; one more gets RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "MEDGEMMA_QUEUE_CAPACITY", default_value_t = 16)]
    pub queue_capacity: usize,
    /// The most images one tower forward encodes: when several requests wait, their images
    /// are encoded together, up to this many at once (activation memory grows with it).
    #[arg(long, env = "MEDGEMMA_MAX_BATCH_IMAGES", default_value_t = 8)]
    pub max_batch_images: usize,
    /// Bytes of embeddings kept for repeated images (LRU, keyed by the image's SHA-256 and
    /// DICOM frame); 0 turns the cache off. 256 MiB holds ~100 MedGemma 4B embeddings in f32
    /// (2.5 MiB each).
    #[arg(long, env = "MEDGEMMA_EMBEDDING_CACHE_BYTES", default_value_t = 256 << 20)]
    pub embedding_cache_bytes: usize,
    /// Seconds in-flight calls may run after SIGTERM before their connections are closed.
    #[arg(long, env = "MEDGEMMA_DRAIN_TIMEOUT_S", default_value_t = 10)]
    pub drain_timeout_s: u64,
    /// The model thread's health watchdog.
    #[command(flatten)]
    pub watchdog: medgemma_rpc::worker::WatchdogArgs,
    /// TLS, and mTLS with --tls-client-ca (production: only the gateway's certificate).
    #[command(flatten)]
    pub tls: medgemma_rpc::tls::ServerTlsArgs,
}

impl VisionArgs {
    /// The watchdog these flags describe.
    pub fn watchdog(&self) -> medgemma_rpc::worker::WatchdogOptions {
        self.watchdog.options()
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), VisionServiceError> {
        if self.max_image_bytes == 0 || self.max_image_bytes > medgemma_rpc::MAX_MESSAGE_BYTES / 2 {
            return Err(VisionServiceError::Config(format!(
                "--max-image-bytes must be in 1..={}",
                medgemma_rpc::MAX_MESSAGE_BYTES / 2
            )));
        }
        if self.max_images == 0
            || self.queue_capacity == 0
            || self.demo_text_hidden == 0
            || self.max_batch_images == 0
            || self.max_dicom_depth == 0
            || self.max_dicom_elements == 0
        {
            return Err(VisionServiceError::Config(
                "--max-images, --queue-capacity, --max-batch-images, --max-dicom-depth, \
                 --max-dicom-elements and --demo-text-hidden must be at least 1"
                    .into(),
            ));
        }
        self.dtype()?;
        Ok(())
    }

    fn dtype(&self) -> Result<DType, VisionServiceError> {
        let default = match self.device.parse::<DeviceSpec>() {
            Ok(DeviceSpec::Cuda(_)) => "bf16",
            _ => "f32",
        };
        match self.dtype.as_deref().unwrap_or(default) {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            other => Err(VisionServiceError::Config(format!(
                "--dtype {other:?}: expected f32 or bf16 (f16 overflows in Gemma 3)"
            ))),
        }
    }

    fn device(&self) -> Result<Device, VisionServiceError> {
        DeviceSpec::open_str(&self.device)
            .map_err(|e| VisionServiceError::Config(format!("--device: {e}")))
    }

    /// Loads the tower (blocking: run it off the async runtime) and starts the service.
    pub fn load(&self) -> Result<VisionService, VisionServiceError> {
        let dtype = self.dtype()?;
        let device = self.device()?;
        let (encoder, default_id) = match &self.model {
            Some(dir) => {
                let e = VisionEncoder::load(dir, &device, dtype).map_err(|e| {
                    VisionServiceError::Config(format!("loading {}: {e}", dir.display()))
                })?;
                let id = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "vision".into());
                (e, id)
            }
            None => (
                VisionEncoder::demo(self.demo_text_hidden, self.demo_seed, &device, dtype)
                    .map_err(|e| VisionServiceError::Config(format!("demo tower: {e}")))?,
                "demo-siglip-random".to_owned(),
            ),
        };
        let settings = VisionSettings {
            model_id: self.model_id.clone().unwrap_or(default_id),
            max_image_bytes: self.max_image_bytes,
            max_pixels: self.max_pixels,
            max_images: self.max_images,
            queue_capacity: self.queue_capacity,
            embedding_dtype: self.embedding_dtype,
            max_batch_images: self.max_batch_images,
            embedding_cache_bytes: self.embedding_cache_bytes,
            max_dicom_depth: self.max_dicom_depth,
            max_dicom_elements: self.max_dicom_elements,
        };
        VisionService::new(encoder, settings)
    }
}
