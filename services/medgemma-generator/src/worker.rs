//! The model thread: owns the [`Engine`] (and its KV cache), takes jobs from a bounded queue one
//! at a time, and reports tokens and results back over per-job channels.
//!
//! A job whose caller is gone (the response receiver was dropped: the client cancelled or
//! disconnected) or whose deadline passed is stopped at the next token; one that is already
//! dead when it leaves the queue is never run. Batching several jobs per step is a later change
//! of [`run_job`]: jobs already carry everything a batch slot needs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use medgemma_engine::EngineError;
use medgemma_engine::generate::{Engine, GenerationOutput, GenerationRequest, TokenEvent};
use medgemma_engine::sampling::Sampled;
use medgemma_model::{Gemma3, KvCacheConfig};
use medgemma_tokenizer::Tokenizer;
use tokio::sync::{mpsc, oneshot};

/// One request for the model thread.
pub(crate) struct Job {
    pub request: GenerationRequest,
    /// Tokens (when `stream`) and the result go back here; a closed channel cancels the job.
    pub events: mpsc::UnboundedSender<Event>,
    /// Send one [`Event::Token`] per generated token.
    pub stream: bool,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
}

/// What the model thread reports for a job.
pub(crate) enum Event {
    Token {
        text_delta: String,
        sampled: Sampled,
    },
    Done(Result<Finished, JobError>),
}

/// A completed job.
pub(crate) struct Finished {
    pub output: GenerationOutput,
    pub queue_time: Duration,
}

/// Why a job produced no result.
#[derive(Debug)]
pub(crate) enum JobError {
    /// The deadline passed, in the queue (`queued`) or while generating.
    DeadlineExceeded { queued: bool },
    /// The engine refused or failed the request.
    Engine(EngineError),
    /// The engine panicked (a bug); the job was abandoned.
    Panicked,
}

/// Load figures shared with the async side.
#[derive(Debug, Default)]
pub(crate) struct WorkerStats {
    pub active: AtomicU32,
    pub kv_bytes_in_use: AtomicU64,
    pub requests_served: AtomicU64,
}

/// Starts the model thread. The returned receiver resolves once the one-token warm-up is done
/// (or failed, in which case the thread has exited).
pub(crate) fn spawn(
    model: Arc<Gemma3>,
    tokenizer: Arc<Tokenizer>,
    kv: KvCacheConfig,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<WorkerStats>,
) -> std::io::Result<oneshot::Receiver<Result<(), EngineError>>> {
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("medgemma-engine".into())
        .spawn(move || {
            let warm_id = tokenizer
                .bos_id()
                .or(model.config().text.bos_token_id)
                .unwrap_or(0);
            let mut engine = Engine::new(model, tokenizer, kv);
            let warm = engine
                .generate(&GenerationRequest::new(vec![warm_id], 1), &mut |_| true)
                .map(|_| ());
            let failed = warm.is_err();
            let _ = ready_tx.send(warm);
            if failed {
                return;
            }
            tracing::info!("model thread ready");
            while let Some(job) = jobs.blocking_recv() {
                run_job(&mut engine, job, &stats);
            }
            tracing::info!("model thread stopped: the queue is closed");
        })?;
    Ok(ready_rx)
}

fn run_job(engine: &mut Engine, job: Job, stats: &WorkerStats) {
    let Job {
        request,
        events,
        stream,
        deadline,
        enqueued,
    } = job;
    let queue_time = enqueued.elapsed();
    let result = if events.is_closed() {
        tracing::debug!("job cancelled while queued");
        None
    } else if deadline.is_some_and(|d| Instant::now() >= d) {
        tracing::debug!("job deadline expired while queued");
        Some(Err(JobError::DeadlineExceeded { queued: true }))
    } else {
        stats.active.store(1, Ordering::Relaxed);
        let mut deadline_hit = false;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            engine.generate(&request, &mut |ev: &TokenEvent<'_>| {
                stats
                    .kv_bytes_in_use
                    .store(ev.kv_bytes_in_use as u64, Ordering::Relaxed);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    deadline_hit = true;
                    return false;
                }
                if stream {
                    events
                        .send(Event::Token {
                            text_delta: ev.text_delta.to_owned(),
                            sampled: ev.sampled.clone(),
                        })
                        .is_ok()
                } else {
                    !events.is_closed()
                }
            })
        }));
        stats
            .kv_bytes_in_use
            .store(engine.kv_bytes_in_use() as u64, Ordering::Relaxed);
        stats.active.store(0, Ordering::Relaxed);
        Some(match outcome {
            Ok(Ok(_)) if deadline_hit => Err(JobError::DeadlineExceeded { queued: false }),
            Ok(Ok(output)) => Ok(Finished { output, queue_time }),
            Ok(Err(e)) => Err(JobError::Engine(e)),
            Err(_) => {
                tracing::error!("the engine panicked; the request was abandoned");
                Err(JobError::Panicked)
            }
        })
    };
    stats.requests_served.fetch_add(1, Ordering::Relaxed);
    if let Some(result) = result {
        // The caller may be gone by now; nothing to do then.
        let _ = events.send(Event::Done(result));
    }
}
