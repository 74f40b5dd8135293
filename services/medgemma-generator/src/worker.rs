//! The model thread: owns the [`Engine`] (and its KV cache) and runs its scheduler loop. New
//! jobs join the running batch between steps (continuous batching); each step is one forward
//! call over every running sequence; tokens and results go back over per-job channels.
//!
//! A job whose caller is gone (the response receiver was dropped: the client cancelled or
//! disconnected) or whose deadline passed leaves the queue or the batch before the next step,
//! wherever it is, and its KV blocks are freed. A panic inside a step fails the sequences that
//! were running (INTERNAL) and the thread keeps serving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medgemma_engine::EngineError;
use medgemma_engine::generate::{
    Engine, EngineStats, GenerationOutput, GenerationRequest, SchedulerConfig, SequenceId,
    StepEvent,
};
use medgemma_engine::sampling::Sampled;
use medgemma_model::{Gemma3, KvCacheConfig};
use medgemma_rpc::worker::{self, Jobs, Pulse, Queue};
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
    /// The RPC's span: the parent of the queue, prefill and decode spans.
    pub span: tracing::Span,
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
    /// From submission until the sequence was first scheduled.
    pub queue_time: Duration,
}

/// Why a job produced no result.
#[derive(Debug)]
pub(crate) enum JobError {
    /// The deadline passed, waiting (`queued`) or while generating.
    DeadlineExceeded { queued: bool },
    /// The engine refused or failed the request.
    Engine(EngineError),
}

/// Load figures shared with the async side.
#[derive(Debug, Default)]
pub(crate) struct WorkerStats {
    /// The metric labels of this engine: `[model_name, engine]`.
    pub labels: [String; 2],
    /// Jobs submitted and not yet answered (in the channel, waiting or running).
    pub in_system: AtomicUsize,
    pub requests_served: AtomicU64,
    /// The engine's figures after its last step.
    pub engine: Mutex<EngineStats>,
}

impl WorkerStats {
    pub fn engine(&self) -> EngineStats {
        *self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A job the engine has admitted.
struct Live {
    events: mpsc::UnboundedSender<Event>,
    stream: bool,
    deadline: Option<Instant>,
    /// Time spent in the channel before admission.
    channel_wait: Duration,
    span: tracing::Span,
    enqueued: Instant,
    /// When the last token came (inter-token latency), none before the first (TTFT).
    last_token: Option<Instant>,
    /// The largest batch a step of this sequence ran in.
    max_batch: usize,
}

/// The model thread's queue, and the receiver that resolves once the one-token warm-up is done
/// (or failed, in which case the thread has exited).
pub(crate) type Started = (Queue<Job>, oneshot::Receiver<Result<(), EngineError>>);

/// Starts the model thread (through [`medgemma_rpc::worker`]: a bounded queue of `capacity`
/// jobs, every step under its panic guard).
pub(crate) fn spawn(
    model: Arc<Gemma3>,
    tokenizer: Arc<Tokenizer>,
    kv: KvCacheConfig,
    sched: SchedulerConfig,
    capacity: usize,
    stats: Arc<WorkerStats>,
) -> std::io::Result<Started> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (queue, _pulse) = worker::spawn("medgemma-engine", capacity, move |jobs, pulse| {
        let warm_id = tokenizer
            .bos_id()
            .or(model.config().text.bos_token_id)
            .unwrap_or(0);
        let mut engine = Engine::with_scheduler(model, tokenizer, kv, sched);
        let warm = engine
            .generate(&GenerationRequest::new(vec![warm_id], 1), &mut |_| true)
            .map(|_| ());
        let failed = warm.is_err();
        let _ = ready_tx.send(warm);
        if failed {
            return;
        }
        tracing::info!(
            max_running = sched.max_running,
            max_batch_tokens = sched.max_batch_tokens,
            "model thread ready"
        );
        Scheduler {
            engine,
            jobs,
            pulse,
            live: HashMap::new(),
            stats,
        }
        .run();
        tracing::info!("model thread stopped: the queue is closed");
    })?;
    Ok((queue, ready_rx))
}

struct Scheduler {
    engine: Engine,
    jobs: Jobs<Job>,
    pulse: Pulse,
    live: HashMap<SequenceId, Live>,
    stats: Arc<WorkerStats>,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if !self.engine.has_work() {
                match self.jobs.recv() {
                    Some(job) => self.accept(job),
                    None => return,
                }
            }
            while let Some(job) = self.jobs.try_recv() {
                self.accept(job);
            }
            self.drop_dead();
            self.publish();
            if self.engine.has_work() {
                self.step();
            }
        }
    }

    /// The engine's figures for `Stats`, published before any caller hears of a step.
    fn publish(&self) {
        let now = self.engine.stats();
        let before = std::mem::replace(
            &mut *self.stats.engine.lock().unwrap_or_else(|p| p.into_inner()),
            now,
        );
        crate::telemetry::engine_gauges(&self.stats, &before, &now);
    }

    /// Answers a job and forgets it.
    fn answer(
        &mut self,
        events: &mpsc::UnboundedSender<Event>,
        result: Result<Finished, JobError>,
    ) {
        // Counted before the caller hears of it, so `Stats` never lags a response.
        self.stats.in_system.fetch_sub(1, Ordering::Relaxed);
        self.stats.requests_served.fetch_add(1, Ordering::Relaxed);
        // The caller may be gone by now; nothing to do then.
        let _ = events.send(Event::Done(result));
    }

    fn accept(&mut self, job: Job) {
        let Job {
            request,
            events,
            stream,
            deadline,
            enqueued,
            span,
        } = job;
        if events.is_closed() {
            tracing::debug!("job cancelled while queued");
            self.stats.in_system.fetch_sub(1, Ordering::Relaxed);
            self.stats.requests_served.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::debug!("job deadline expired while queued");
            self.answer(&events, Err(JobError::DeadlineExceeded { queued: true }));
            return;
        }
        let constrained = request.constraint.is_some();
        let admit_start = std::time::SystemTime::now();
        let admitted = self.engine.admit(request);
        if constrained {
            // Admission compiles the JSON-schema / regex constraint (llguidance).
            crate::telemetry::constraint_span(&span, admit_start, admitted.is_ok());
        }
        match admitted {
            Ok(id) => {
                self.live.insert(
                    id,
                    Live {
                        events,
                        stream,
                        deadline,
                        channel_wait: enqueued.elapsed(),
                        span,
                        enqueued,
                        last_token: None,
                        max_batch: 0,
                    },
                );
            }
            Err(e) => self.answer(&events, Err(JobError::Engine(e))),
        }
    }

    /// Cancels every job whose caller went away or whose deadline passed, wherever it is.
    fn drop_dead(&mut self) {
        let now = Instant::now();
        let dead: Vec<(SequenceId, bool)> = self
            .live
            .iter()
            .filter_map(|(&id, l)| {
                if l.events.is_closed() {
                    Some((id, false))
                } else {
                    l.deadline.is_some_and(|d| now >= d).then_some((id, true))
                }
            })
            .collect();
        for (id, expired) in dead {
            let queued = self.engine.is_waiting(id);
            self.engine.cancel(id);
            let live = self.live.remove(&id).expect("listed above");
            if expired {
                tracing::debug!(queued, "job deadline expired");
                self.answer(&live.events, Err(JobError::DeadlineExceeded { queued }));
            } else {
                tracing::debug!(queued, "job cancelled by its caller");
                self.stats.in_system.fetch_sub(1, Ordering::Relaxed);
                self.stats.requests_served.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn step(&mut self) {
        let result = self.pulse.guard(|| self.engine.step());
        self.publish();
        let events = match result {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a step failed; failing the jobs it held");
                let ids: Vec<SequenceId> = self.live.keys().copied().collect();
                for id in ids {
                    self.engine.cancel(id);
                    let live = self.live.remove(&id).expect("listed");
                    self.answer(
                        &live.events,
                        Err(JobError::Engine(EngineError::Internal(e.to_string()))),
                    );
                }
                return;
            }
            Err(_) => {
                // The engine freed the running sequences' blocks; the next step reports them.
                tracing::error!("the engine panicked; the running requests fail");
                return;
            }
        };
        let batch = self.engine.stats().last_batch;
        let now = Instant::now();
        for ev in events {
            match ev {
                StepEvent::Token {
                    id,
                    sampled,
                    text_delta,
                } => {
                    let Some(live) = self.live.get_mut(&id) else {
                        continue;
                    };
                    crate::telemetry::token(&self.stats, live.enqueued, live.last_token, now);
                    live.last_token = Some(now);
                    live.max_batch = live.max_batch.max(batch);
                    if live.stream
                        && live
                            .events
                            .send(Event::Token {
                                text_delta,
                                sampled,
                            })
                            .is_err()
                    {
                        // Picked up by `drop_dead` before the next step.
                        continue;
                    }
                }
                StepEvent::Finished { id, output } => {
                    if let Some(live) = self.live.remove(&id) {
                        let queue_time = live.channel_wait + output.queue_time;
                        crate::telemetry::finished(
                            &self.stats,
                            &live.span,
                            live.enqueued,
                            queue_time,
                            live.max_batch.max(batch),
                            &output,
                        );
                        self.answer(
                            &live.events,
                            Ok(Finished {
                                output: *output,
                                queue_time,
                            }),
                        );
                    }
                }
                StepEvent::Failed { id, error } => {
                    if let Some(live) = self.live.remove(&id) {
                        self.answer(&live.events, Err(JobError::Engine(error)));
                    }
                }
            }
        }
    }
}
