//! `medgemma.vision.v1.VisionEncoder`: validation at the edge, the encoder on its own thread
//! behind a bounded queue, embeddings back as raw little-endian bytes with dtype and shape.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use medgemma_proto::vision::v1 as pb;
use medgemma_rpc::FieldViolation;
use medgemma_vision::{DecodeOptions, VisionEncoder, detect_format};
use pb::vision_encoder_server::{VisionEncoder as VisionEncoderRpc, VisionEncoderServer};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::error::{VisionServiceError, is_input_error};

/// The element type of returned embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbeddingDType {
    F32,
    Bf16,
}

impl EmbeddingDType {
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// Limits and labels of the service.
#[derive(Debug, Clone)]
pub struct VisionSettings {
    /// Reported in responses.
    pub model_id: String,
    /// The largest `Image.data`, in bytes.
    pub max_image_bytes: usize,
    /// The largest decoded image, in pixels.
    pub max_pixels: u64,
    /// The most images in one request.
    pub max_images: usize,
    /// Requests that may wait for the encoder.
    pub queue_capacity: usize,
    /// The dtype of returned embeddings.
    pub embedding_dtype: EmbeddingDType,
}

impl VisionSettings {
    /// Defaults for a model id: 20 MiB images, 100 megapixels, 8 images a request, a queue of
    /// 16, f32 embeddings.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            model_id: model_id.into(),
            max_image_bytes: 20 << 20,
            max_pixels: medgemma_vision::decode::DEFAULT_MAX_PIXELS,
            max_images: 8,
            queue_capacity: 16,
            embedding_dtype: EmbeddingDType::F32,
        }
    }
}

struct Job {
    images: Vec<pb::Image>,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Vec<Encoded>, VisionServiceError>>,
}

struct Encoded {
    data: Vec<u8>,
    shape: Vec<u32>,
}

struct Inner {
    settings: VisionSettings,
    tokens_per_image: u32,
    hidden_size: u32,
    image_size: u32,
    random: bool,
    jobs: mpsc::Sender<Job>,
    warm: Mutex<Option<oneshot::Receiver<Result<(), String>>>>,
}

/// The vision service: clone freely (one encoder thread behind all clones).
#[derive(Clone)]
pub struct VisionService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VisionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionService")
            .field("settings", &self.inner.settings)
            .field("tokens_per_image", &self.inner.tokens_per_image)
            .field("hidden_size", &self.inner.hidden_size)
            .field("random", &self.inner.random)
            .finish()
    }
}

impl VisionService {
    /// Starts the encoder thread (it warms up with one small image first; see
    /// [`warmed`](Self::warmed)).
    pub fn new(
        encoder: VisionEncoder,
        settings: VisionSettings,
    ) -> Result<Self, VisionServiceError> {
        if settings.queue_capacity == 0 || settings.max_images == 0 || settings.max_image_bytes == 0
        {
            return Err(VisionServiceError::Config(
                "queue capacity, images per request and image bytes must be at least 1".into(),
            ));
        }
        let cfg = encoder.config().clone();
        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let (warm_tx, warm_rx) = oneshot::channel();
        let decode = DecodeOptions {
            max_encoded_bytes: settings.max_image_bytes,
            max_pixels: settings.max_pixels,
            frame: 0,
        };
        let random = encoder.is_random();
        let dtype = settings.embedding_dtype;
        std::thread::Builder::new()
            .name("vision-encoder".into())
            .spawn(move || worker(encoder, decode, dtype, rx, warm_tx))
            .map_err(|e| {
                VisionServiceError::Config(format!("cannot start the encoder thread: {e}"))
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                tokens_per_image: u32::try_from(cfg.mm_tokens_per_image).unwrap_or(u32::MAX),
                hidden_size: u32::try_from(cfg.text_hidden_size).unwrap_or(u32::MAX),
                image_size: u32::try_from(cfg.vision.image_size).unwrap_or(u32::MAX),
                random,
                settings,
                jobs: tx,
                warm: Mutex::new(Some(warm_rx)),
            }),
        })
    }

    /// Waits for the encoder's warm-up (the first call waits; later ones return at once).
    pub async fn warmed(&self) -> Result<(), VisionServiceError> {
        let rx = self.inner.warm.lock().ok().and_then(|mut w| w.take());
        match rx {
            None => Ok(()),
            Some(rx) => rx
                .await
                .map_err(|_| VisionServiceError::WorkerGone)?
                .map_err(VisionServiceError::Config),
        }
    }

    /// Soft tokens per image (rows of an embedding).
    pub fn tokens_per_image(&self) -> usize {
        self.inner.tokens_per_image as usize
    }

    /// The width of an embedding row (the decoder's hidden size).
    pub fn hidden_size(&self) -> usize {
        self.inner.hidden_size as usize
    }

    /// Whether the tower is the seeded random demo one.
    pub fn is_random(&self) -> bool {
        self.inner.random
    }

    /// The tonic server for this service, with raised message limits.
    pub fn into_server(self) -> VisionEncoderServer<Self> {
        medgemma_rpc::with_limits!(VisionEncoderServer::new(self))
    }

    fn validate(&self, images: &[pb::Image]) -> Result<(), VisionServiceError> {
        let s = &self.inner.settings;
        let mut v = Vec::new();
        if images.is_empty() {
            v.push(FieldViolation::new(
                "images",
                "must hold at least one image",
            ));
        }
        if images.len() > s.max_images {
            v.push(FieldViolation::new(
                "images",
                format!(
                    "holds {} images, more than the limit of {}",
                    images.len(),
                    s.max_images
                ),
            ));
        }
        for (i, img) in images.iter().enumerate() {
            let field = format!("images[{i}].data");
            if img.data.is_empty() {
                v.push(FieldViolation::new(field, "must not be empty"));
            } else if img.data.len() > s.max_image_bytes {
                v.push(FieldViolation::new(
                    field,
                    format!(
                        "is {} bytes, more than the limit of {} bytes",
                        img.data.len(),
                        s.max_image_bytes
                    ),
                ));
            } else if detect_format(&img.data).is_none() {
                v.push(FieldViolation::new(
                    field,
                    "is not an image this service reads (PNG, JPEG, WebP, TIFF or DICOM Part 10)",
                ));
            }
            if let Err(problem) = medgemma_proto::image_media_type(&img.mime_type) {
                v.push(FieldViolation::new(
                    format!("images[{i}].mime_type"),
                    problem,
                ));
            }
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(VisionServiceError::InvalidArgument(v))
        }
    }

    /// Encodes `images`, waiting at most `timeout`.
    pub async fn embed(
        &self,
        images: Vec<pb::Image>,
        timeout: Option<Duration>,
    ) -> Result<pb::EmbedResponse, VisionServiceError> {
        self.validate(&images)?;
        let started = Instant::now();
        let hashes: Vec<String> = images
            .iter()
            .map(|i| hex::encode(Sha256::digest(&i.data)))
            .collect();
        let (reply, rx) = oneshot::channel();
        let job = Job {
            images,
            deadline: timeout.and_then(|t| started.checked_add(t)),
            reply,
        };
        self.inner.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => VisionServiceError::Overloaded {
                capacity: self.inner.settings.queue_capacity,
            },
            mpsc::error::TrySendError::Closed(_) => VisionServiceError::WorkerGone,
        })?;
        let encoded = match timeout {
            Some(t) => tokio::time::timeout(t, rx)
                .await
                .map_err(|_| VisionServiceError::DeadlineExceeded)?,
            None => rx.await,
        }
        .map_err(|_| VisionServiceError::WorkerGone)??;
        let dtype = self.inner.settings.embedding_dtype.name();
        Ok(pb::EmbedResponse {
            embeddings: encoded
                .into_iter()
                .zip(hashes)
                .map(|(e, sha256)| pb::Embedding {
                    data: e.data,
                    dtype: dtype.to_owned(),
                    shape: e.shape,
                    sha256,
                })
                .collect(),
            model_id: self.inner.settings.model_id.clone(),
            encode_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// The encoder thread: warm up, then one job at a time until every sender is gone.
fn worker(
    encoder: VisionEncoder,
    decode: DecodeOptions,
    dtype: EmbeddingDType,
    mut jobs: mpsc::Receiver<Job>,
    warm: oneshot::Sender<Result<(), String>>,
) {
    let size = 32;
    let gray = medgemma_vision::RgbImage::from_pixel(size, size, image::Rgb([128, 128, 128]));
    let warmed = encoder
        .encode_image(&gray)
        .map(|_| ())
        .map_err(|e| format!("warm-up encode failed: {e}"));
    let ok = warmed.is_ok();
    let _ = warm.send(warmed);
    if !ok {
        return;
    }
    while let Some(job) = jobs.blocking_recv() {
        let expired = job.deadline.is_some_and(|d| Instant::now() >= d);
        if expired || job.reply.is_closed() {
            // The caller gave up while the job waited: skip the work.
            let _ = job.reply.send(Err(VisionServiceError::DeadlineExceeded));
            continue;
        }
        let mut out = Vec::with_capacity(job.images.len());
        let mut result = Ok(());
        for (index, img) in job.images.iter().enumerate() {
            if job.reply.is_closed() {
                result = Err(VisionServiceError::DeadlineExceeded);
                break;
            }
            let opts = DecodeOptions {
                frame: img.dicom_frame.unwrap_or(0),
                ..decode.clone()
            };
            match encoder
                .encode_bytes(&img.data, &opts)
                .and_then(|t| to_bytes(&t, dtype))
            {
                Ok(e) => out.push(e),
                Err(source) => {
                    result = Err(if is_input_error(&source) {
                        VisionServiceError::BadImage { index, source }
                    } else {
                        VisionServiceError::Encode { index, source }
                    });
                    break;
                }
            }
        }
        let _ = job.reply.send(result.map(|()| out));
    }
}

fn to_bytes(t: &Tensor, dtype: EmbeddingDType) -> Result<Encoded, medgemma_vision::VisionError> {
    let shape: Vec<u32> = t
        .dims()
        .iter()
        .map(|&d| u32::try_from(d).unwrap_or(u32::MAX))
        .collect();
    let flat = t.flatten_all()?;
    let data = match dtype {
        EmbeddingDType::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .flat_map(f32::to_le_bytes)
            .collect(),
        EmbeddingDType::Bf16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .into_iter()
            .flat_map(half::bf16::to_le_bytes)
            .collect(),
    };
    Ok(Encoded { data, shape })
}

#[tonic::async_trait]
impl VisionEncoderRpc for VisionService {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let timeout = medgemma_rpc::deadline::remaining(&request);
        let images = request.into_inner().images;
        let n = images.len();
        let r = VisionService::embed(self, images, timeout)
            .await
            .map_err(|e| {
                tracing::info!(images = n, error = %e, "embed failed");
                Status::from(e)
            })?;
        tracing::debug!(images = n, encode_ms = r.encode_ms, "embedded");
        Ok(Response::new(r))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let s = &self.inner.settings;
        Ok(Response::new(pb::InfoResponse {
            model_id: s.model_id.clone(),
            image_size: self.inner.image_size,
            tokens_per_image: self.inner.tokens_per_image,
            hidden_size: self.inner.hidden_size,
            dtype: s.embedding_dtype.name().to_owned(),
            max_image_bytes: s.max_image_bytes as u64,
        }))
    }
}
