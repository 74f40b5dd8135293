//! `medgemma.vision.v1.VisionEncoder`: validation at the edge, the encoder on its own thread
//! behind a bounded queue, embeddings back as raw little-endian bytes with dtype and shape.
//!
//! The encoder thread batches: when several requests wait, it takes up to
//! `max_batch_images` of their images at once and runs one tower forward over all of them
//! ([`VisionEncoder::encode_bytes_batch`]); an image that does not decode fails only its own
//! request. Embeddings are kept in an LRU [`EmbeddingCache`] by image SHA-256 and DICOM frame:
//! a request whose images are all cached is answered at the edge without queueing, and a cached
//! image in a queued request is not encoded again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use medgemma_proto::vision::v1 as pb;
use medgemma_rpc::FieldViolation;
use medgemma_rpc::worker::{self, Jobs, Pulse, Queue, SendError};
use medgemma_vision::{DecodeOptions, VisionEncoder};
use pb::vision_encoder_server::{VisionEncoder as VisionEncoderRpc, VisionEncoderServer};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::cache::{CacheKey, EmbeddingCache, Encoded};
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
    /// The most images one tower forward encodes (the images of several waiting requests).
    pub max_batch_images: usize,
    /// The embedding cache's byte bound; 0 turns it off.
    pub embedding_cache_bytes: usize,
    /// The deepest nesting of DICOM sequences accepted (checked before parsing).
    pub max_dicom_depth: u32,
    /// The most DICOM elements accepted (checked before parsing).
    pub max_dicom_elements: u64,
}

impl VisionSettings {
    /// Defaults for a model id: 20 MiB images, 100 megapixels, 8 images a request, a queue of
    /// 16, f32 embeddings, batches of up to 8 images, a 256 MiB embedding cache.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            model_id: model_id.into(),
            max_image_bytes: 20 << 20,
            max_pixels: medgemma_vision::decode::DEFAULT_MAX_PIXELS,
            max_images: 8,
            queue_capacity: 16,
            embedding_dtype: EmbeddingDType::F32,
            max_batch_images: 8,
            embedding_cache_bytes: 256 << 20,
            max_dicom_depth: medgemma_vision::decode::DEFAULT_MAX_DICOM_DEPTH,
            max_dicom_elements: medgemma_vision::decode::DEFAULT_MAX_DICOM_ELEMENTS,
        }
    }
}

/// A snapshot of the service's load, its batches and its embedding cache (what the `Stats` RPC
/// reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VisionStats {
    /// Requests accepted and not yet taken into a batch.
    pub waiting: usize,
    /// Tower forwards run since start (the warm-up not counted).
    pub batches: u64,
    /// Images in the last tower forward.
    pub last_batch_images: u32,
    /// The most images one tower forward has encoded since start.
    pub largest_batch_images: u32,
    /// Images encoded by the tower since start.
    pub images_encoded: u64,
    /// Images looked up in the embedding cache (none while it is off).
    pub cache_queries: u64,
    /// Of those, images served from the cache instead of being encoded.
    pub cache_hits: u64,
    /// Embeddings held in the cache.
    pub cache_entries: usize,
    /// Bytes the cache holds.
    pub cache_bytes: usize,
}

struct Job {
    images: Vec<pb::Image>,
    keys: Vec<CacheKey>,
    deadline: Option<Instant>,
    /// The RPC's span (the parent of the batch's spans) and when the job was queued.
    span: tracing::Span,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Vec<Arc<Encoded>>, VisionServiceError>>,
}

/// Counters the encoder thread and the edge update, read by [`VisionService::stats`].
#[derive(Default)]
struct Counters {
    waiting: AtomicUsize,
    batches: AtomicU64,
    last_batch: AtomicU32,
    largest_batch: AtomicU32,
    images_encoded: AtomicU64,
    cache_queries: AtomicU64,
    cache_hits: AtomicU64,
}

impl Counters {
    fn batch_ran(&self, images: usize) {
        let n = u32::try_from(images).unwrap_or(u32::MAX);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.images_encoded
            .fetch_add(images as u64, Ordering::Relaxed);
        self.last_batch.store(n, Ordering::Relaxed);
        self.largest_batch.fetch_max(n, Ordering::Relaxed);
    }

    fn cache_looked_up(&self, queries: usize, hits: usize) {
        self.cache_queries
            .fetch_add(queries as u64, Ordering::Relaxed);
        self.cache_hits.fetch_add(hits as u64, Ordering::Relaxed);
    }
}

/// Holds the encoder thread between batches while set (see [`VisionService::hold`]).
#[derive(Default)]
struct Gate {
    held: Mutex<bool>,
    released: Condvar,
}

impl Gate {
    fn set(&self, held: bool) {
        if let Ok(mut h) = self.held.lock() {
            *h = held;
        }
        self.released.notify_all();
    }

    fn wait_open(&self) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        while *held {
            held = match self.released.wait(held) {
                Ok(h) => h,
                Err(_) => return,
            };
        }
    }
}

/// What the edge and the encoder thread share.
struct Shared {
    counters: Counters,
    cache: Mutex<EmbeddingCache>,
    gate: Gate,
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, EmbeddingCache> {
        // A panic while holding the lock leaves a consistent map (every update completes
        // before it can unwind), so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Inner {
    settings: VisionSettings,
    tokens_per_image: u32,
    hidden_size: u32,
    image_size: u32,
    random: bool,
    jobs: Queue<Job>,
    warm: Mutex<Option<oneshot::Receiver<Result<(), String>>>>,
    shared: Arc<Shared>,
}

/// While alive, the encoder thread starts no new batch (see [`VisionService::hold`]).
#[must_use = "the encoder is released when the guard is dropped"]
pub struct HoldGuard {
    shared: Arc<Shared>,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.shared.gate.set(false);
    }
}

impl std::fmt::Debug for HoldGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HoldGuard")
    }
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
        if settings.queue_capacity == 0
            || settings.max_images == 0
            || settings.max_image_bytes == 0
            || settings.max_batch_images == 0
        {
            return Err(VisionServiceError::Config(
                "queue capacity, images per request and per batch, and image bytes must be at \
                 least 1"
                    .into(),
            ));
        }
        let cfg = encoder.config().clone();
        let (warm_tx, warm_rx) = oneshot::channel();
        let decode = DecodeOptions {
            max_encoded_bytes: settings.max_image_bytes,
            max_pixels: settings.max_pixels,
            frame: 0,
            max_dicom_depth: settings.max_dicom_depth,
            max_dicom_elements: settings.max_dicom_elements,
        };
        let random = encoder.is_random();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            cache: Mutex::new(EmbeddingCache::new(settings.embedding_cache_bytes)),
            gate: Gate::default(),
        });
        let ctx = WorkerContext {
            model_id: settings.model_id.clone(),
            decode,
            dtype: settings.embedding_dtype,
            max_batch_images: settings.max_batch_images,
            shared: Arc::clone(&shared),
        };
        let (tx, _pulse) = worker::spawn(
            "vision-encoder",
            settings.queue_capacity,
            move |jobs, pulse| worker(encoder, ctx, jobs, &pulse, warm_tx),
        )
        .map_err(|e| VisionServiceError::Config(format!("cannot start the encoder thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                tokens_per_image: u32::try_from(cfg.mm_tokens_per_image).unwrap_or(u32::MAX),
                hidden_size: u32::try_from(cfg.text_hidden_size).unwrap_or(u32::MAX),
                image_size: u32::try_from(cfg.vision.image_size).unwrap_or(u32::MAX),
                random,
                settings,
                jobs: tx,
                warm: Mutex::new(Some(warm_rx)),
                shared,
            }),
        })
    }

    /// The encoder thread's pulse, for the health watchdog.
    pub fn pulse(&self) -> &Pulse {
        self.inner.jobs.pulse()
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

    /// Batches, cache and queue counters now.
    pub fn stats(&self) -> VisionStats {
        let c = &self.inner.shared.counters;
        let (cache_entries, cache_bytes) = {
            let cache = self.inner.shared.cache();
            (cache.len(), cache.bytes())
        };
        VisionStats {
            waiting: c.waiting.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            last_batch_images: c.last_batch.load(Ordering::Relaxed),
            largest_batch_images: c.largest_batch.load(Ordering::Relaxed),
            images_encoded: c.images_encoded.load(Ordering::Relaxed),
            cache_queries: c.cache_queries.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_entries,
            cache_bytes,
        }
    }

    /// Holds the encoder thread: until the guard is dropped it starts no new batch (a batch
    /// already running finishes) and requests wait in the queue, which then answers
    /// RESOURCE_EXHAUSTED once full. For a drain under operator control, and for tests that
    /// need a full queue without racing the encoder. The job the thread may already have taken
    /// off the queue waits with the others and joins the first batch after the release.
    pub fn hold(&self) -> HoldGuard {
        self.inner.shared.gate.set(true);
        HoldGuard {
            shared: Arc::clone(&self.inner.shared),
        }
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
            } else if medgemma_proto::image_format(&img.data).is_none() {
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
        let keys: Vec<CacheKey> = images
            .iter()
            .map(|i| CacheKey {
                sha256: Sha256::digest(&i.data).into(),
                frame: i.dicom_frame.unwrap_or(0),
            })
            .collect();
        let encoded = match self.all_cached(&keys) {
            Some(hit) => hit,
            None => self.enqueue(images, &keys, started, timeout).await?,
        };
        let dtype = self.inner.settings.embedding_dtype.name();
        Ok(pb::EmbedResponse {
            embeddings: encoded
                .into_iter()
                .zip(&keys)
                .map(|(e, key)| {
                    let (data, shape) = match Arc::try_unwrap(e) {
                        Ok(e) => (e.data, e.shape),
                        Err(shared) => (shared.data.clone(), shared.shape.clone()),
                    };
                    pb::Embedding {
                        data,
                        dtype: dtype.to_owned(),
                        shape,
                        sha256: hex::encode(key.sha256),
                    }
                })
                .collect(),
            model_id: self.inner.settings.model_id.clone(),
            encode_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Every image's embedding from the cache, or `None` (then nothing is counted: the encoder
    /// thread looks the images up again and counts them).
    fn all_cached(&self, keys: &[CacheKey]) -> Option<Vec<Arc<Encoded>>> {
        let shared = &self.inner.shared;
        let mut cache = shared.cache();
        if !cache.enabled() || !keys.iter().all(|k| cache.contains(k)) {
            return None;
        }
        let hit = keys
            .iter()
            .map(|k| cache.get(k))
            .collect::<Option<Vec<_>>>()?;
        shared.counters.cache_looked_up(keys.len(), keys.len());
        Some(hit)
    }

    async fn enqueue(
        &self,
        images: Vec<pb::Image>,
        keys: &[CacheKey],
        started: Instant,
        timeout: Option<Duration>,
    ) -> Result<Vec<Arc<Encoded>>, VisionServiceError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            images,
            keys: keys.to_vec(),
            deadline: timeout.and_then(|t| started.checked_add(t)),
            reply,
            span: tracing::Span::current(),
            enqueued: Instant::now(),
        };
        // Counted before the send: the encoder thread may take the job at once.
        let waiting = &self.inner.shared.counters.waiting;
        let now_waiting = waiting.fetch_add(1, Ordering::Relaxed) + 1;
        crate::telemetry::waiting(&self.inner.settings.model_id, now_waiting);
        self.inner.jobs.try_send(job).map_err(|(e, _)| {
            waiting.fetch_sub(1, Ordering::Relaxed);
            match e {
                SendError::Full => VisionServiceError::Overloaded {
                    capacity: self.inner.settings.queue_capacity,
                },
                SendError::Gone => VisionServiceError::WorkerGone,
            }
        })?;
        match timeout {
            Some(t) => tokio::time::timeout(t, rx)
                .await
                .map_err(|_| VisionServiceError::DeadlineExceeded)?,
            None => rx.await,
        }
        // A dropped reply: the batch panicked (the thread lives on: INTERNAL, a request that
        // crashes the encoder is not one to retry elsewhere), or the thread is gone.
        .map_err(|_| {
            if self.pulse().is_alive() {
                VisionServiceError::Crashed
            } else {
                VisionServiceError::WorkerGone
            }
        })?
    }
}

/// What the encoder thread needs besides the encoder and its queue.
struct WorkerContext {
    model_id: String,
    decode: DecodeOptions,
    dtype: EmbeddingDType,
    max_batch_images: usize,
    shared: Arc<Shared>,
}

/// The encoder thread: warm up, then batch after batch until every sender is gone. A batch is
/// the first waiting job and then every job already queued behind it, as long as their images
/// fit in `max_batch_images` (a job that does not fit starts the next batch; a job bigger than
/// a batch on its own is encoded in several forwards).
///
/// [`VisionService::hold`] stops it after it has taken the first job of the next batch.
fn worker(
    encoder: VisionEncoder,
    ctx: WorkerContext,
    mut jobs: Jobs<Job>,
    pulse: &Pulse,
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
    let mut next: Option<Job> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Some(job) => job,
                None => return,
            },
        };
        ctx.shared.gate.wait_open();
        let mut images = first.images.len();
        let mut batch = vec![first];
        while images < ctx.max_batch_images {
            match jobs.try_recv() {
                Some(job) if images + job.images.len() <= ctx.max_batch_images => {
                    images += job.images.len();
                    batch.push(job);
                }
                Some(job) => {
                    next = Some(job);
                    break;
                }
                None => break,
            }
        }
        let left = ctx
            .shared
            .counters
            .waiting
            .fetch_sub(batch.len(), Ordering::Relaxed)
            .saturating_sub(batch.len());
        crate::telemetry::waiting(&ctx.model_id, left);
        // A panic inside a batch drops its jobs' reply senders (their callers get INTERNAL)
        // and the thread keeps serving the next batch.
        let _ = pulse.guard(|| run_batch(&encoder, &ctx, batch));
    }
}

/// Where one image of a job gets its embedding.
enum Source {
    /// From the cache (found before the batch ran).
    Cached(Arc<Encoded>),
    /// From this entry of the batch's encoding work.
    Work(usize),
}

type WorkResult = Result<Arc<Encoded>, Arc<medgemma_vision::VisionError>>;

/// Encodes the images of `batch` that are not cached, `max_batch_images` per tower forward,
/// and answers each job: its embeddings, or the error of its first image that failed.
fn run_batch(encoder: &VisionEncoder, ctx: &WorkerContext, batch: Vec<Job>) {
    // Jobs whose callers gave up or whose deadline passed while they waited: skip the work.
    let now = Instant::now();
    let live: Vec<Job> = batch
        .into_iter()
        .filter_map(|job| {
            if job.deadline.is_some_and(|d| now >= d) || job.reply.is_closed() {
                let _ = job.reply.send(Err(VisionServiceError::DeadlineExceeded));
                None
            } else {
                Some(job)
            }
        })
        .collect();
    let Some(first) = live.first() else {
        return;
    };
    let batch_images: usize = live.iter().map(|j| j.images.len()).sum();
    let batch_span = crate::telemetry::batch_span(&first.span, live.len(), batch_images);
    let _entered = batch_span.enter();
    for job in &live {
        crate::telemetry::queued(&ctx.model_id, &job.span, job.enqueued, now);
    }
    // Each image: from the cache, from an identical image earlier in this batch (when the
    // cache is on, the second is a hit, as it would be one batch later), or to encode.
    let mut work: Vec<(&pb::Image, CacheKey)> = Vec::new();
    let mut plans: Vec<Vec<Source>> = Vec::with_capacity(live.len());
    {
        let mut cache = ctx.shared.cache();
        let caching = cache.enabled();
        let mut in_batch: HashMap<CacheKey, usize> = HashMap::new();
        let (mut queries, mut hits) = (0, 0);
        for job in &live {
            let mut plan = Vec::with_capacity(job.images.len());
            for (img, key) in job.images.iter().zip(&job.keys) {
                if caching {
                    queries += 1;
                    if let Some(e) = cache.get(key) {
                        hits += 1;
                        plan.push(Source::Cached(e));
                        continue;
                    }
                    if let Some(&w) = in_batch.get(key) {
                        hits += 1;
                        plan.push(Source::Work(w));
                        continue;
                    }
                    in_batch.insert(*key, work.len());
                }
                plan.push(Source::Work(work.len()));
                work.push((img, *key));
            }
            plans.push(plan);
        }
        if caching {
            ctx.shared.counters.cache_looked_up(queries, hits);
            crate::telemetry::images("cached", hits);
        }
    }
    let mut results: Vec<WorkResult> = Vec::with_capacity(work.len());
    for chunk in work.chunks(ctx.max_batch_images) {
        encode_chunk(encoder, ctx, chunk, &mut results);
    }
    for (job, plan) in live.into_iter().zip(plans) {
        let reply = plan
            .into_iter()
            .enumerate()
            .map(|(index, source)| match source {
                Source::Cached(e) => Ok(e),
                Source::Work(w) => results[w].clone().map_err(|source| {
                    if is_input_error(&source) {
                        VisionServiceError::BadImage { index, source }
                    } else {
                        VisionServiceError::Encode { index, source }
                    }
                }),
            })
            .collect::<Result<Vec<_>, _>>();
        let _ = job.reply.send(reply);
    }
}

/// One tower forward over `chunk`; appends one result per image to `results` and caches what
/// was encoded.
fn encode_chunk(
    encoder: &VisionEncoder,
    ctx: &WorkerContext,
    chunk: &[(&pb::Image, CacheKey)],
    results: &mut Vec<WorkResult>,
) {
    let inputs: Vec<(&[u8], DecodeOptions)> = chunk
        .iter()
        .map(|(img, key)| {
            (
                img.data.as_slice(),
                DecodeOptions {
                    frame: key.frame,
                    ..ctx.decode.clone()
                },
            )
        })
        .collect();
    let started = Instant::now();
    let encoded = encoder.encode_bytes_batch(&inputs);
    crate::telemetry::encoded(started.elapsed(), &encoded);
    let encoded = match encoded {
        Ok(per_image) => per_image,
        Err(e) => {
            // The forward itself failed: every image of the chunk shares the error.
            let e = Arc::new(e);
            results.extend(chunk.iter().map(|_| Err(Arc::clone(&e))));
            return;
        }
    };
    let ran = encoded.iter().filter(|r| r.is_ok()).count();
    if ran > 0 {
        ctx.shared.counters.batch_ran(ran);
    }
    let mut cache = ctx.shared.cache();
    for ((_, key), r) in chunk.iter().zip(encoded) {
        let r = r.and_then(|t| to_bytes(&t, ctx.dtype)).map(Arc::new);
        if let Ok(e) = &r {
            cache.insert(*key, Arc::clone(e));
        }
        results.push(r.map_err(Arc::new));
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

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let st = self.stats();
        let s = &self.inner.settings;
        let u32_of = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(pb::StatsResponse {
            queue_depth: u32_of(st.waiting),
            queue_capacity: u32_of(s.queue_capacity),
            batches: st.batches,
            last_batch_images: st.last_batch_images,
            largest_batch_images: st.largest_batch_images,
            max_batch_images: u32_of(s.max_batch_images),
            images_encoded: st.images_encoded,
            cache_queries: st.cache_queries,
            cache_hits: st.cache_hits,
            cache_entries: st.cache_entries as u64,
            cache_bytes: st.cache_bytes as u64,
            cache_capacity_bytes: s.embedding_cache_bytes as u64,
        }))
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
