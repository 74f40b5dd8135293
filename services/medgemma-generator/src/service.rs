//! The `medgemma.generation.v1.Generator` service: validation and conversion at the edge, the
//! model behind a bounded queue.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use medgemma_engine::generate::FinishReason as EngineFinish;
use medgemma_engine::sampling::Sampled;
use medgemma_model::{Gemma3, KvCacheConfig};
use medgemma_proto::generation::v1 as pb;
use medgemma_proto::generation::v1::generator_server::{Generator, GeneratorServer};
use medgemma_rpc::worker::{Pulse, Queue, SendError};
use medgemma_tokenizer::Tokenizer;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::UnboundedReceiverStream};
use tonic::{Request, Response, Status};

use crate::config::GeneratorConfig;
use crate::convert::{Incoming, ModelInfo, Submitted};
use crate::error::{GeneratorError, engine_status};
use crate::worker::{self, Event, Finished, Job, JobError, WorkerStats};

struct Ready {
    jobs: Queue<Job>,
    stats: Arc<WorkerStats>,
    info: ModelInfo,
    /// The KV byte limit in force (the configured one, or the memory plan's).
    kv_limit: Option<usize>,
}

struct Inner {
    config: GeneratorConfig,
    ready: OnceLock<Ready>,
}

/// The generator service. Answers UNAVAILABLE until [`start`](Self::start) has loaded the
/// worker; clone freely (all clones share one model thread).
#[derive(Clone)]
pub struct GeneratorService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GeneratorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratorService")
            .field("config", &self.inner.config)
            .field("ready", &self.inner.ready.get().is_some())
            .finish()
    }
}

impl GeneratorService {
    /// A service with no model yet.
    pub fn new(config: GeneratorConfig) -> Result<Self, GeneratorError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                ready: OnceLock::new(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GeneratorConfig {
        &self.inner.config
    }

    /// Starts the model thread with `model` and `tokenizer`, waits for its one-token warm-up,
    /// then accepts requests. Fails if already started.
    pub async fn start(
        &self,
        model: Arc<Gemma3>,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<(), GeneratorError> {
        self.start_with(model, tokenizer, None).await
    }

    /// As [`GeneratorService::start`], with the KV cache configuration of a memory plan in
    /// place of the configured one.
    pub async fn start_with(
        &self,
        model: Arc<Gemma3>,
        tokenizer: Arc<Tokenizer>,
        kv: Option<KvCacheConfig>,
    ) -> Result<(), GeneratorError> {
        let kv = kv.unwrap_or(self.inner.config.kv_cache);
        if self.inner.ready.get().is_some() {
            return Err(GeneratorError::Config(
                "the generator is already started".into(),
            ));
        }
        let cfg = model.config();
        let info = ModelInfo {
            context_length: cfg.text.max_position_embeddings,
            vocab_size: cfg.text.vocab_size,
            hidden_size: cfg.text.hidden_size,
            image_token_id: cfg.multimodal.as_ref().map(|m| m.image_token_index),
            tokens_per_image: cfg
                .multimodal
                .as_ref()
                .map(|m| u32::try_from(m.mm_tokens_per_image).unwrap_or(u32::MAX)),
            eos_token_ids: medgemma_engine::generate::stop_ids(&model, &tokenizer),
        };
        let stats = Arc::new(WorkerStats {
            labels: crate::telemetry::engine_labels(&self.inner.config.model_id),
            ..WorkerStats::default()
        });
        let cfg = &self.inner.config;
        // Never more than running + waiting jobs are in the system (`submit`'s admission).
        let capacity = cfg.scheduler.max_running + cfg.queue_capacity;
        let (tx, warm) =
            worker::spawn(model, tokenizer, kv, cfg.scheduler, capacity, stats.clone()).map_err(
                |e| GeneratorError::Config(format!("cannot start the model thread: {e}")),
            )?;
        let t = Instant::now();
        warm.await
            .map_err(|_| GeneratorError::WorkerGone)?
            .map_err(GeneratorError::Warmup)?;
        tracing::info!(
            warmup_ms = t.elapsed().as_secs_f64() * 1e3,
            model_id = %self.inner.config.model_id,
            "generator ready"
        );
        self.inner
            .ready
            .set(Ready {
                jobs: tx,
                stats,
                info,
                kv_limit: kv.max_bytes,
            })
            .map_err(|_| GeneratorError::Config("the generator is already started".into()))
    }

    /// The model thread's pulse (for the health watchdog), once started.
    pub fn pulse(&self) -> Option<&Pulse> {
        self.inner.ready.get().map(|r| r.jobs.pulse())
    }

    /// The tonic server for this service, with raised message limits.
    pub fn into_server(self) -> GeneratorServer<Self> {
        medgemma_rpc::with_limits!(GeneratorServer::new(self))
    }

    fn ready(&self) -> Result<&Ready, Status> {
        self.inner
            .ready
            .get()
            .ok_or_else(|| Status::unavailable("the model is loading"))
    }

    /// Current load figures (what the `Stats` RPC returns).
    pub fn stats(&self) -> pb::StatsResponse {
        let cfg = &self.inner.config;
        let mut out = pb::StatsResponse {
            queue_capacity: cfg.queue_capacity as u32,
            kv_bytes_limit: cfg.kv_cache.max_bytes.unwrap_or(0) as u64,
            max_running: cfg.scheduler.max_running as u32,
            max_batch_tokens: cfg.scheduler.max_batch_tokens as u32,
            ..Default::default()
        };
        if let Some(r) = self.inner.ready.get() {
            out.kv_bytes_limit = r.kv_limit.unwrap_or(0) as u64;
            let e = r.stats.engine();
            let in_system = r.stats.in_system.load(Ordering::Relaxed);
            out.active_sequences = e.running as u32;
            out.queue_depth = in_system.saturating_sub(e.running) as u32;
            out.kv_bytes_in_use = e.kv_bytes_in_use as u64;
            out.requests_served = r.stats.requests_served.load(Ordering::Relaxed);
            out.steps = e.steps;
            out.last_batch_size = e.last_batch as u32;
            out.max_batch_size = e.max_batch as u32;
            out.prefix_cache_query_tokens = e.prefix_query_tokens;
            out.prefix_cache_hit_tokens = e.prefix_hit_tokens;
            out.kv_blocks_used = e.kv_blocks_used as u64;
            out.kv_blocks_free = e.kv_blocks_free.map(|f| f as u64);
            out.preemptions = e.preemptions;
        }
        out
    }

    /// Validates and enqueues; the receiver gets the job's events.
    fn submit(
        &self,
        request: Request<pb::GenerateRequest>,
        stream: bool,
    ) -> Result<(mpsc::UnboundedReceiver<Event>, bool), Status> {
        let ready = self.ready()?;
        let deadline = medgemma_rpc::deadline::Deadline::of(&request, None)
            .instant()
            .map(tokio::time::Instant::into_std);
        let Submitted {
            request,
            want_logprobs,
        } = Submitted::try_from(Incoming {
            request: request.into_inner(),
            info: &ready.info,
            config: &self.inner.config,
        })
        .map_err(medgemma_rpc::bad_request_violations)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let span = crate::telemetry::generate_span(
            &self.inner.config.model_id,
            &request,
            ready.info.tokens_per_image,
        );
        let job = Job {
            request,
            events: tx,
            stream,
            deadline,
            enqueued: Instant::now(),
            span,
        };
        // Room for `max_running` running sequences and `queue_capacity` waiting ones.
        let cfg = &self.inner.config;
        let room = cfg.scheduler.max_running + cfg.queue_capacity;
        let taken = ready
            .stats
            .in_system
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < room).then_some(n + 1)
            });
        if taken.is_err() {
            // Nothing was started: the RetryInfo lets a gateway try another replica at once.
            return Err(medgemma_rpc::overloaded(
                format!(
                    "the generator queue is full ({} running, {} waiting); retry later",
                    cfg.scheduler.max_running, cfg.queue_capacity
                ),
                QUEUE_FULL_RETRY_AFTER,
            ));
        }
        match ready.jobs.try_send(job) {
            Ok(()) => Ok((rx, want_logprobs)),
            Err((e, _)) => {
                ready.stats.in_system.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    SendError::Full => medgemma_rpc::overloaded(
                        "the generator queue is full; retry later",
                        QUEUE_FULL_RETRY_AFTER,
                    ),
                    SendError::Gone => Status::unavailable("the model worker has stopped"),
                })
            }
        }
    }
}

/// The retry delay a queue-full rejection suggests (`google.rpc.RetryInfo`).
const QUEUE_FULL_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

fn finish_reason(f: EngineFinish) -> pb::FinishReason {
    match f {
        EngineFinish::Stop => pb::FinishReason::Stop,
        EngineFinish::Length => pb::FinishReason::Length,
        EngineFinish::Cancelled => pb::FinishReason::Cancelled,
    }
}

fn token_logprobs(s: &Sampled) -> pb::GeneratedTokenLogprobs {
    pb::GeneratedTokenLogprobs {
        token_id: s.token,
        logprob: s.logprob,
        top: s
            .top
            .iter()
            .map(|&(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
            .collect(),
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn response(finished: Finished, want_logprobs: bool, model_id: &str) -> pb::GenerateResponse {
    let Finished { output, queue_time } = finished;
    pb::GenerateResponse {
        usage: Some(pb::Usage {
            prompt_tokens: output.prompt_token_ids.len() as u32,
            completion_tokens: output.token_ids.len() as u32,
        }),
        timings: Some(pb::Timings {
            queue_ms: ms(queue_time),
            prefill_ms: ms(output.prefill_time),
            decode_ms: ms(output.decode_time),
        }),
        finish_reason: finish_reason(output.finish_reason) as i32,
        logprobs: if want_logprobs {
            output.logprobs.iter().map(token_logprobs).collect()
        } else {
            Vec::new()
        },
        first_token_logprobs: output
            .first_token_logprobs
            .iter()
            .map(|&(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
            .collect(),
        token_ids: output.token_ids,
        text: output.text,
        model_id: model_id.to_owned(),
    }
}

/// What a caller gets when the model thread died while holding its request.
fn worker_died() -> Status {
    Status::internal("the model worker stopped while generating this request")
}

/// A stream of at most one error, decided when it is polled (after the stream before it).
fn error_at_end(
    f: impl FnOnce() -> Option<Status> + Send + 'static,
) -> impl Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send + 'static {
    let mut f = Some(f);
    tokio_stream::iter(std::iter::from_fn(move || {
        f.take().and_then(|f| f()).map(Err)
    }))
}

fn job_status(e: JobError) -> Status {
    match e {
        JobError::DeadlineExceeded { queued: true } => {
            Status::deadline_exceeded("the deadline expired while the request was queued")
        }
        JobError::DeadlineExceeded { queued: false } => {
            Status::deadline_exceeded("the deadline expired during generation")
        }
        JobError::Engine(e) => engine_status(&e),
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generator for GeneratorService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (mut events, want_logprobs) = self.submit(request, false)?;
        // Dropping this future (client gone, deadline) drops `events`: the job stops.
        while let Some(event) = events.recv().await {
            match event {
                Event::Token { .. } => {}
                Event::Done(result) => {
                    return result
                        .map(|f| {
                            Response::new(response(f, want_logprobs, &self.inner.config.model_id))
                        })
                        .map_err(job_status);
                }
            }
        }
        // The thread answers every job it takes; a closed channel without an answer means it
        // died holding this request (INTERNAL: a gateway must not replay it elsewhere).
        Err(worker_died())
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (events, want_logprobs) = self.submit(request, true)?;
        let model_id = self.inner.config.model_id.clone();
        // The stream owns the receiver: when tonic drops it (client cancelled or disconnected),
        // the model thread sees a closed channel and stops at the next token.
        // A stream never ends OK after partial output: if the thread dies before the final
        // response, the caller gets INTERNAL as the last message.
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = ended.clone();
        let stream = UnboundedReceiverStream::new(events).map(move |event| {
            use pb::generate_stream_response::Event as Out;
            match event {
                Event::Token {
                    text_delta,
                    sampled,
                } => Ok(pb::GenerateStreamResponse {
                    event: Some(Out::Delta(pb::GenerateDelta {
                        text: text_delta,
                        token_ids: vec![sampled.token],
                        logprobs: if want_logprobs {
                            vec![token_logprobs(&sampled)]
                        } else {
                            Vec::new()
                        },
                    })),
                }),
                Event::Done(result) => {
                    seen.store(true, Ordering::Release);
                    result
                        .map(|f| pb::GenerateStreamResponse {
                            event: Some(Out::Response(response(f, want_logprobs, &model_id))),
                        })
                        .map_err(job_status)
                }
            }
        });
        let stream = stream.chain(error_at_end(move || {
            (!ended.load(Ordering::Acquire)).then(worker_died)
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(GeneratorService::stats(self)))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let ready = self.ready()?;
        let i = &ready.info;
        Ok(Response::new(pb::InfoResponse {
            model_id: self.inner.config.model_id.clone(),
            context_length: i.context_length as u32,
            vocab_size: i.vocab_size as u32,
            hidden_size: i.hidden_size as u32,
            accepts_image_embeddings: i.image_token_id.is_some(),
            image_token_id: i.image_token_id,
            tokens_per_image: i.tokens_per_image,
            eos_token_ids: i.eos_token_ids.clone(),
            default_max_new_tokens: self.inner.config.default_max_new_tokens,
        }))
    }
}
