//! The step-driven engine: [`Engine::admit`] a request, [`Engine::step`] the whole batch (one
//! forward call over every running sequence: one decode row each, plus prefill chunks under a
//! per-step token budget), [`Engine::cancel`] at any time. Sampling, constraints, stop strings
//! and incremental decoding stay per sequence; continuous batching is the caller calling
//! `admit` between steps.
//!
//! Scheduling (in the manner of vLLM's chunked prefill and TGI's batching task): decode rows
//! go first so a long prompt never stalls the others; prompts are prefilled in chunks of at
//! most `max_batch_tokens` rows per step (an image's soft tokens are never split, so they keep
//! attending to each other both ways); a waiting sequence is started only when the KV blocks it
//! needs are free; when the cache runs out mid-decode the newest running sequence is preempted
//! (its blocks freed, recomputed later from its tokens, so its output is unchanged).
//!
//! The engine is synchronous and owns the KV cache; services run it on a dedicated thread
//! (never on the async runtime).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use medgemma_model::{Gemma3, KvCache, KvCacheConfig, LogitsRows, SeqInput, SequenceKv};
use medgemma_tokenizer::{IncrementalDecoder, Tokenizer};
use sha2::{Digest, Sha256};

use crate::constraint::{Constraint, ConstraintFactory, ConstraintSpec};
use crate::error::{EngineError, Result};
use crate::sampling::{Sampled, Sampler, SamplingParams};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An eos id, a stop string, or a completed constrained structure.
    Stop,
    /// The token budget (or the context) ran out first.
    Length,
    /// The caller asked to stop (client cancelled or disconnected).
    Cancelled,
}

impl FinishReason {
    /// The name used in JSON and RPC responses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    /// Embeddings for the prompt's image-token rows, `[n, hidden]`.
    pub image_embeds: Option<Tensor>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Keep going past eos ids (benchmarks).
    pub ignore_eos: bool,
    /// Constrain the output to a JSON schema or regex.
    pub constraint: Option<ConstraintSpec>,
    /// Token ids whose log-probabilities at the first generated position are reported in
    /// [`GenerationOutput::first_token_logprobs`]: the raw log-softmax of the model's logits
    /// there, before sampling settings, penalties or constraints (a multiple-choice answer reads
    /// the model's own probabilities of the option letters this way).
    pub logprob_token_ids: Vec<u32>,
}

impl GenerationRequest {
    /// A greedy request for `max_new_tokens` tokens.
    pub fn new(prompt_ids: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt_ids,
            image_embeds: None,
            sampling: SamplingParams::default(),
            max_new_tokens,
            stop_strings: Vec::new(),
            ignore_eos: false,
            constraint: None,
            logprob_token_ids: Vec::new(),
        }
    }
}

/// What a streaming callback sees after each token.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    /// Index of the request in the batch.
    pub index: usize,
    pub sampled: &'a Sampled,
    /// New text since the previous event (whole UTF-8 characters only).
    pub text_delta: &'a str,
    /// KV-cache bytes held by all sequences now (for load reporting).
    pub kv_bytes_in_use: usize,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids, including the stop token when one ended it.
    pub token_ids: Vec<u32>,
    /// Generated text without special tokens (cut before a matched stop string).
    pub text: String,
    pub finish_reason: FinishReason,
    /// Per generated token: (logprob, top alternatives).
    pub logprobs: Vec<Sampled>,
    /// From admission until the sequence was first scheduled.
    pub queue_time: Duration,
    /// From first scheduled until the first token.
    pub prefill_time: Duration,
    /// From the first token until the end.
    pub decode_time: Duration,
    /// KV cache bytes held by this sequence at its longest.
    pub kv_bytes_peak: usize,
    /// `(id, logprob)` for each of the request's `logprob_token_ids`, in request order, at the
    /// first generated position; empty when none were asked for (or no token was generated).
    pub first_token_logprobs: Vec<(u32, f32)>,
    /// Prompt tokens whose KV came from the prefix cache (not prefilled).
    pub prefix_cached_tokens: usize,
    /// The forward steps that prefilled this sequence's prompt until its first token, in order.
    pub prefill_chunks: Vec<PrefillChunk>,
}

/// One step's share of a sequence's prefill.
#[derive(Debug, Clone, Copy)]
pub struct PrefillChunk {
    /// When the step's forward began and ended.
    pub start: Instant,
    pub end: Instant,
    /// Prompt tokens this sequence ran in the step.
    pub tokens: usize,
    /// Sequences in the step (decode rows and prefill chunks).
    pub batch: usize,
}

impl GenerationOutput {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_token_ids.len(), self.prefill_time)
    }

    /// Generated tokens per second after the first (which prefill produced).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.token_ids.len().saturating_sub(1), self.decode_time)
    }
}

/// The log-softmax of `row` at `ids`, computed in f64 (max-subtracted).
fn log_softmax_at(row: &[f32], ids: &[u32]) -> Result<Vec<(u32, f32)>> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Err(EngineError::Internal(
            "the logits row has no finite maximum".into(),
        ));
    }
    let max = f64::from(max);
    let log_sum = row
        .iter()
        .map(|&x| (f64::from(x) - max).exp())
        .sum::<f64>()
        .ln();
    ids.iter()
        .map(|&id| {
            let x = row.get(id as usize).copied().ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "logprob token id {id} is outside the logits row ({})",
                    row.len()
                ))
            })?;
            Ok((id, (f64::from(x) - max - log_sum) as f32))
        })
        .collect()
}

fn rate(n: usize, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if n == 0 || s <= 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// How the engine batches: the per-step token budget, the most sequences running at once, the
/// longest prompt accepted.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Rows one step may run: every decode row plus prefill chunks (`--max-batch-tokens`).
    pub max_batch_tokens: usize,
    /// Sequences running at once (`--max-running`); more wait.
    pub max_running: usize,
    /// The longest prompt accepted (`--max-input-tokens`); `None`: the model's context.
    pub max_input_tokens: Option<usize>,
    /// Reuse the KV blocks of prompt prefixes seen before (`--prefix-caching`).
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_running: 64,
            max_input_tokens: None,
            prefix_caching: true,
        }
    }
}

/// Identifies an admitted sequence.
pub type SequenceId = u64;

/// What a step reports.
#[derive(Debug)]
pub enum StepEvent {
    /// A sequence produced a token.
    Token {
        id: SequenceId,
        sampled: Sampled,
        /// New text since the previous token (whole UTF-8 characters only).
        text_delta: String,
    },
    /// A sequence ended; its KV blocks are free.
    Finished {
        id: SequenceId,
        output: Box<GenerationOutput>,
    },
    /// A sequence failed; its KV blocks are free.
    Failed { id: SequenceId, error: EngineError },
}

/// Load figures of the engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Sequences in the last step.
    pub last_batch: usize,
    /// The most sequences one step has run since start.
    pub max_batch: usize,
    pub steps: u64,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// KV blocks (of `block_size` positions across every layer) in use, and free under the
    /// byte limit (`None`: no limit).
    pub kv_blocks_used: usize,
    pub kv_blocks_free: Option<usize>,
    pub kv_bytes_in_use: usize,
    pub preemptions: u64,
}

/// A loaded model with its tokenizer, KV cache and the sequences it is running.
pub struct Engine {
    model: Arc<Gemma3>,
    tokenizer: Arc<Tokenizer>,
    kv: KvCache,
    eos_ids: Vec<u32>,
    constraints: Option<Arc<ConstraintFactory>>,
    sched: SchedulerConfig,
    seqs: HashMap<SequenceId, Sequence>,
    /// Admission order; preempted sequences go back to the front.
    waiting: VecDeque<SequenceId>,
    /// Start order (the newest last: the first to be preempted).
    running: Vec<SequenceId>,
    next_id: SequenceId,
    stats: EngineStats,
    /// Sequences a panic abandoned, reported as failed by the next step.
    abandoned: Vec<SequenceId>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("eos_ids", &self.eos_ids)
            .field("sched", &self.sched)
            .field("stats", &self.stats)
            .finish()
    }
}

/// One sequence: its tokens, KV blocks, sampler and stop state.
struct Sequence {
    kv: SequenceKv,
    sampler: Sampler,
    constraint: Option<Constraint>,
    /// Prompt then generated tokens; the positions `kv.len()..` are not in the cache yet.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Embeddings of the prompt's image-token rows, in order.
    image_embeds: Option<Tensor>,
    /// Salts the sequence's prefix-cache keys: a hash of its image embeddings (0: none).
    salt: u128,
    logprobs: Vec<Sampled>,
    /// Ids whose first-position logprobs are wanted, and what was found for them.
    first_token_ids: Vec<u32>,
    first_token_logprobs: Vec<(u32, f32)>,
    budget: usize,
    stop_strings: Vec<String>,
    ignore_eos: bool,
    /// Streams whole characters of the generated text.
    decoder: IncrementalDecoder,
    /// Text streamed so far (searched for stop strings).
    emitted: String,
    text_cut: Option<usize>,
    finish: Option<FinishReason>,
    admitted: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    kv_peak: usize,
    prefix_cached: usize,
    prefill_chunks: Vec<PrefillChunk>,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens not in the cache yet: the prompt (or its rest), or the last sampled token, or,
    /// after a preemption, everything.
    fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len()
    }
}

impl Engine {
    /// Wraps a model and tokenizer with the default scheduler settings. Stop ids are
    /// [`stop_ids`]: the model's eos ids and the tokenizer's, `<end_of_turn>` among them (a chat
    /// turn ends with it; stopping on `<eos>` alone runs to the budget).
    pub fn new(model: Arc<Gemma3>, tokenizer: Arc<Tokenizer>, kv: KvCacheConfig) -> Self {
        Self::with_scheduler(model, tokenizer, kv, SchedulerConfig::default())
    }

    /// Wraps a model and tokenizer with these scheduler settings.
    pub fn with_scheduler(
        model: Arc<Gemma3>,
        tokenizer: Arc<Tokenizer>,
        kv: KvCacheConfig,
        sched: SchedulerConfig,
    ) -> Self {
        let eos_ids = stop_ids(&model, &tokenizer);
        let mut kv = model.new_kv_cache(kv);
        kv.set_prefix_caching(sched.prefix_caching);
        let sched = SchedulerConfig {
            max_batch_tokens: sched.max_batch_tokens.max(1),
            max_running: sched.max_running.max(1),
            ..sched
        };
        let mut e = Self {
            model,
            tokenizer,
            kv,
            eos_ids,
            constraints: None,
            sched,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
            abandoned: Vec::new(),
        };
        e.refresh_stats();
        e
    }

    /// The ids that end a sequence.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn model(&self) -> &Arc<Gemma3> {
        &self.model
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The scheduler settings.
    pub fn scheduler(&self) -> &SchedulerConfig {
        &self.sched
    }

    /// Bytes of KV cache held by sequences now.
    pub fn kv_bytes_in_use(&self) -> usize {
        self.kv.bytes_in_use()
    }

    /// Load figures after the last step.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Whether any sequence is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty() || !self.abandoned.is_empty()
    }

    /// Whether `id` is admitted but not started (or preempted and waiting to resume).
    pub fn is_waiting(&self, id: SequenceId) -> bool {
        self.waiting.contains(&id)
    }

    fn constraint_factory(&mut self) -> Result<Arc<ConstraintFactory>> {
        if let Some(f) = &self.constraints {
            return Ok(f.clone());
        }
        let f = Arc::new(ConstraintFactory::new(
            self.tokenizer.inner(),
            &self.eos_ids,
            self.model.config().text.vocab_size,
        )?);
        self.constraints = Some(f.clone());
        Ok(f)
    }

    /// Checks a request and queues it; it runs from the next [`step`](Self::step) on, when
    /// there is room. Every refusal names its limit.
    pub fn admit(&mut self, r: GenerationRequest) -> Result<SequenceId> {
        let ctx = self.model.config().text.max_position_embeddings;
        let n = r.prompt_ids.len();
        if n == 0 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if n >= ctx {
            return Err(EngineError::ContextExceeded {
                prompt_tokens: n,
                context: ctx,
            });
        }
        if let Some(limit) = self.sched.max_input_tokens.filter(|&l| n > l) {
            return Err(EngineError::InputTooLong { tokens: n, limit });
        }
        if let Some(max) = self.kv.max_bytes() {
            let need = self
                .kv
                .bytes_for_sequence(n + 1, self.sched.max_batch_tokens);
            let fits = self.kv.fits_pools(n + 1, self.sched.max_batch_tokens);
            if need > max || !fits {
                return Err(EngineError::KvCapacity {
                    prompt_tokens: n,
                    need_bytes: need,
                    limit_bytes: max,
                });
            }
        }
        self.check_tokens(&r)?;
        let vocab = self.model.config().text.vocab_size;
        if let Some(&id) = r.logprob_token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "logprob token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        let sampler = Sampler::new(r.sampling.clone())?;
        let constraint = match &r.constraint {
            Some(spec) => Some(self.constraint_factory()?.create(spec)?),
            None => None,
        };
        let salt = match &r.image_embeds {
            Some(e) => embeddings_salt(e)?,
            None => 0,
        };
        let id = self.next_id;
        self.next_id += 1;
        let seq = Sequence {
            kv: self.kv.new_salted_sequence(salt),
            salt,
            sampler,
            constraint,
            tokens: r.prompt_ids,
            prompt_len: n,
            image_embeds: r.image_embeds,
            logprobs: Vec::new(),
            first_token_ids: r.logprob_token_ids,
            first_token_logprobs: Vec::new(),
            budget: r.max_new_tokens.min(ctx - n),
            stop_strings: r
                .stop_strings
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            ignore_eos: r.ignore_eos,
            decoder: IncrementalDecoder::new(true),
            emitted: String::new(),
            text_cut: None,
            finish: None,
            admitted: Instant::now(),
            scheduled: None,
            first_token: None,
            kv_peak: 0,
            prefix_cached: 0,
            prefill_chunks: Vec::new(),
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        self.refresh_stats();
        Ok(id)
    }

    /// What the model would refuse in a forward call, refused here instead, so that one bad
    /// request never fails the batch it would join: ids outside the vocabulary, image
    /// embeddings that do not match the prompt's image tokens.
    fn check_tokens(&self, r: &GenerationRequest) -> Result<()> {
        let cfg = self.model.config();
        let image = cfg.multimodal.as_ref().map(|m| m.image_token_index);
        let vocab = cfg.text.vocab_size;
        if let Some(&id) = r
            .prompt_ids
            .iter()
            .find(|&&id| id as usize >= vocab && Some(id) != image)
        {
            return Err(EngineError::InvalidRequest(format!(
                "token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        let tokens = image.map_or(0, |img| count(&r.prompt_ids, img));
        let rows = match &r.image_embeds {
            Some(e) => {
                let (rows, width) = e.dims2()?;
                if width != cfg.text.hidden_size {
                    return Err(EngineError::InvalidRequest(format!(
                        "image embeddings have width {width}, the model's hidden size is {}",
                        cfg.text.hidden_size
                    )));
                }
                rows
            }
            None => 0,
        };
        if rows != tokens {
            return Err(EngineError::InvalidRequest(format!(
                "{tokens} image tokens in the prompt but {rows} image embedding rows given"
            )));
        }
        Ok(())
    }

    /// Stops a sequence at once (waiting or running) and frees its KV blocks; returns what it
    /// had produced, finished as `Cancelled`, or `None` for an unknown id.
    pub fn cancel(&mut self, id: SequenceId) -> Option<GenerationOutput> {
        let mut seq = self.remove(id)?;
        seq.finish = Some(FinishReason::Cancelled);
        self.refresh_stats();
        Some(self.output(seq))
    }

    fn remove(&mut self, id: SequenceId) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.kv.release(&mut seq.kv);
        Some(seq)
    }

    /// One forward call over the running batch; new sequences start first when there is room.
    /// Per-sequence failures come back as [`StepEvent::Failed`]; a panic inside frees the KV
    /// blocks of every running sequence (they are reported failed by the next step).
    pub fn step(&mut self) -> Result<Vec<StepEvent>> {
        /// Frees every running sequence's KV blocks if the step unwinds.
        struct Guard<'a>(&'a mut Engine, bool);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.abandon_running();
                }
            }
        }
        let mut g = Guard(self, false);
        let events = g.0.step_inner();
        g.1 = true;
        events
    }

    fn abandon_running(&mut self) {
        for id in std::mem::take(&mut self.running) {
            if let Some(mut seq) = self.seqs.remove(&id) {
                self.kv.release(&mut seq.kv);
                self.abandoned.push(id);
            }
        }
    }

    fn step_inner(&mut self) -> Result<Vec<StepEvent>> {
        let mut events: Vec<StepEvent> = std::mem::take(&mut self.abandoned)
            .into_iter()
            .map(|id| StepEvent::Failed {
                id,
                error: EngineError::Internal("generation failed unexpectedly".into()),
            })
            .collect();
        self.start_waiting();
        let plan = self.plan();
        if plan.is_empty() {
            self.retire(&mut events);
            self.refresh_stats();
            return Ok(events);
        }
        let started = Instant::now();
        let logits = match self.forward(&plan) {
            Ok(l) => l,
            Err(e) => {
                // The batch failed as a whole: fail its sequences, keep serving.
                let msg = e.to_string();
                for &(id, _) in &plan {
                    if self.remove(id).is_some() {
                        events.push(StepEvent::Failed {
                            id,
                            error: EngineError::Internal(msg.clone()),
                        });
                    }
                }
                self.refresh_stats();
                return Ok(events);
            }
        };
        let in_use = self.kv.bytes_in_use();
        let ended = Instant::now();
        for (&(id, rows), lg) in plan.iter().zip(logits) {
            let seq = self.seqs.get_mut(&id).expect("planned sequences exist");
            seq.kv_peak = seq.kv_peak.max(in_use);
            if seq.first_token.is_none() {
                seq.prefill_chunks.push(PrefillChunk {
                    start: started,
                    end: ended,
                    tokens: rows,
                    batch: plan.len(),
                });
            }
            if seq.pending() > 0 {
                continue; // a prefill chunk that is not the last
            }
            match lg {
                Some(lg) => match sample_next(seq, &lg, &self.tokenizer, &self.eos_ids) {
                    Ok((sampled, text_delta)) => events.push(StepEvent::Token {
                        id,
                        sampled,
                        text_delta,
                    }),
                    Err(error) => {
                        self.remove(id);
                        events.push(StepEvent::Failed { id, error });
                        continue;
                    }
                },
                // A zero budget only prefills.
                None => seq.finish = Some(FinishReason::Length),
            }
        }
        self.stats.steps += 1;
        self.stats.last_batch = plan.len();
        self.stats.max_batch = self.stats.max_batch.max(plan.len());
        self.retire(&mut events);
        self.refresh_stats();
        Ok(events)
    }

    /// Moves waiting sequences to running while there is a slot and the KV blocks of their
    /// first chunk are free (the first always starts when nothing runs: admission checked that
    /// it fits the whole cache). Later growth that does not fit preempts the newest sequence.
    fn start_waiting(&mut self) {
        let image = self.image_token();
        while self.running.len() < self.sched.max_running {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let seq = &self.seqs[&id];
            let first = chunk_len(&seq.tokens, 0, self.sched.max_batch_tokens, image);
            if !self.running.is_empty() && !self.kv.can_reserve(&seq.kv, first) {
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
            seq.scheduled.get_or_insert_with(Instant::now);
            if self.kv.prefix_caching() && seq.kv.is_empty() {
                // Never the whole prompt: its last token must run to give the first logits.
                let hashes = self
                    .kv
                    .prefix_hashes(&seq.tokens[..seq.tokens.len() - 1], seq.salt);
                let hit = self.kv.attach_prefix(&mut seq.kv, &hashes);
                seq.prefix_cached += hit;
                self.stats.prefix_query_tokens += seq.tokens.len() as u64;
                self.stats.prefix_hit_tokens += hit as u64;
            }
        }
    }

    fn image_token(&self) -> Option<u32> {
        self.model
            .config()
            .multimodal
            .as_ref()
            .map(|m| m.image_token_index)
    }

    /// This step's rows: one per decoding sequence first, then prefill chunks in start order
    /// under the token budget. KV blocks are reserved here; when they run out, the newest
    /// running sequence is preempted (freed, and recomputed later).
    fn plan(&mut self) -> Vec<(SequenceId, usize)> {
        let mut order: Vec<SequenceId> = self.running.clone();
        order.sort_by_key(|id| self.seqs[id].pending() > 1);
        let mut plan = Vec::with_capacity(order.len());
        let mut budget = self.sched.max_batch_tokens;
        let mut prefill_started = false;
        let image = self.image_token();
        for id in order {
            if !self.running.contains(&id) {
                continue; // preempted below
            }
            let pending = self.seqs[&id].pending();
            // Decode rows may use up the budget; the oldest prefill still moves (one row at
            // least), so a prompt is never starved by a long stream of decodes.
            if pending > 1 && budget == 0 && prefill_started {
                continue;
            }
            let n = if pending == 1 {
                1
            } else {
                prefill_started = true;
                let seq = &self.seqs[&id];
                chunk_len(&seq.tokens, seq.kv.len(), budget.max(1), image)
            };
            // Make room: preempt the newest running sequence until this one fits.
            loop {
                let seq = &self.seqs[&id];
                if self.kv.can_reserve(&seq.kv, n) {
                    break;
                }
                let victim = *self.running.last().expect("this sequence runs");
                if victim == id && self.running.len() == 1 {
                    // Alone and still too big: the cache is its context.
                    let seq = self.seqs.get_mut(&id).expect("exists");
                    seq.finish = Some(FinishReason::Length);
                    break;
                }
                self.preempt(victim);
                plan.retain(|&(p, _)| p != victim);
                if victim == id {
                    break;
                }
            }
            if !self.running.contains(&id) || self.seqs[&id].finish.is_some() {
                continue;
            }
            let seq = self.seqs.get_mut(&id).expect("exists");
            if self.kv.reserve(&mut seq.kv, n).is_err() {
                continue; // cannot happen after can_reserve; it runs next step
            }
            budget = budget.saturating_sub(n);
            plan.push((id, n));
        }
        plan
    }

    /// Frees a running sequence's blocks and puts it back at the front of the queue; its tokens
    /// are recomputed when it starts again (sampling state is kept, so the output is the same).
    fn preempt(&mut self, id: SequenceId) {
        self.running.retain(|&r| r != id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            self.kv.release(&mut seq.kv);
            seq.kv = self.kv.new_salted_sequence(seq.salt);
            self.waiting.push_front(id);
            self.stats.preemptions += 1;
        }
    }

    fn forward(&mut self, plan: &[(SequenceId, usize)]) -> Result<Vec<Option<Tensor>>> {
        let image = self.image_token();
        // Detach the planned sequences' KV so the inputs can borrow them mutably together.
        let mut kvs: Vec<SequenceKv> = plan
            .iter()
            .map(|(id, _)| {
                let seq = self.seqs.get_mut(id).expect("planned sequences exist");
                std::mem::take(&mut seq.kv)
            })
            .collect();
        let mut embeds: Vec<Option<Tensor>> = Vec::with_capacity(plan.len());
        for ((id, n), kv) in plan.iter().zip(&kvs) {
            let seq = &self.seqs[id];
            let start = kv.len();
            embeds.push(match (&seq.image_embeds, image) {
                (Some(e), Some(img)) => {
                    let before = count(&seq.tokens[..start], img);
                    let here = count(&seq.tokens[start..start + n], img);
                    (here > 0).then(|| e.narrow(0, before, here)).transpose()?
                }
                _ => None,
            });
        }
        let result = {
            let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(plan.len());
            for (((id, n), kv), emb) in plan.iter().zip(kvs.iter_mut()).zip(&embeds) {
                let seq = &self.seqs[id];
                let start = kv.len();
                let last = start + n == seq.tokens.len();
                inputs.push(SeqInput {
                    tokens: &seq.tokens[start..start + n],
                    image_embeds: emb.as_ref(),
                    logits: if last && seq.generated().len() < seq.budget {
                        LogitsRows::Last
                    } else {
                        LogitsRows::None
                    },
                    kv,
                });
            }
            self.model.forward(&mut self.kv, &mut inputs)
        };
        for ((id, _), kv) in plan.iter().zip(kvs) {
            self.seqs.get_mut(id).expect("planned sequences exist").kv = kv;
        }
        Ok(result?)
    }

    /// Ends finished sequences: frees their blocks and reports their outputs.
    fn retire(&mut self, events: &mut Vec<StepEvent>) {
        let done: Vec<SequenceId> = self
            .running
            .iter()
            .copied()
            .filter(|id| self.seqs[id].finish.is_some())
            .collect();
        for id in done {
            let seq = self.remove(id).expect("running sequences exist");
            events.push(StepEvent::Finished {
                id,
                output: Box::new(self.output(seq)),
            });
        }
    }

    fn output(&self, seq: Sequence) -> GenerationOutput {
        // Ids the vocabulary lacks decode as nothing (see `IncrementalDecoder::push`).
        let vocab = self.tokenizer.vocab_size();
        let known: Vec<u32> = seq
            .generated()
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab)
            .collect();
        let mut text = self
            .tokenizer
            .decode(&known, true)
            .unwrap_or_else(|_| seq.emitted.clone());
        if let Some(cut) = seq.text_cut {
            text.truncate(cut);
        }
        let scheduled = seq.scheduled.unwrap_or_else(Instant::now);
        let first = seq.first_token.unwrap_or_else(Instant::now);
        let mut tokens = seq.tokens;
        let generated = tokens.split_off(seq.prompt_len);
        GenerationOutput {
            prompt_token_ids: tokens,
            token_ids: generated,
            text,
            finish_reason: seq.finish.unwrap_or(FinishReason::Cancelled),
            logprobs: seq.logprobs,
            queue_time: scheduled.saturating_duration_since(seq.admitted),
            prefill_time: first.saturating_duration_since(scheduled),
            decode_time: seq.first_token.map(|t| t.elapsed()).unwrap_or_default(),
            kv_bytes_peak: seq.kv_peak,
            first_token_logprobs: seq.first_token_logprobs,
            prefix_cached_tokens: seq.prefix_cached,
            prefill_chunks: seq.prefill_chunks,
        }
    }

    fn refresh_stats(&mut self) {
        let full = self.kv.full_block_bytes().max(1);
        let in_use = self.kv.bytes_in_use();
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        self.stats.kv_bytes_in_use = in_use;
        self.stats.kv_blocks_used = in_use.div_ceil(full);
        self.stats.kv_blocks_free = self.kv.max_bytes().map(|m| m.saturating_sub(in_use) / full);
    }

    /// Runs one request to the end; `on_token` sees every token and returns `false` to cancel.
    pub fn generate(
        &mut self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<GenerationOutput> {
        let mut out = self.generate_batch(std::slice::from_ref(req), on_token)?;
        out.pop().expect("one request, one result")
    }

    /// Runs several requests together through [`admit`](Self::admit) and
    /// [`step`](Self::step) until all have ended. Per-request errors come back in that
    /// request's slot.
    pub fn generate_batch(
        &mut self,
        reqs: &[GenerationRequest],
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Vec<Result<GenerationOutput>>> {
        let mut results: Vec<Option<Result<GenerationOutput>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut index: HashMap<SequenceId, usize> = HashMap::new();
        for (i, r) in reqs.iter().enumerate() {
            match self.admit(r.clone()) {
                Ok(id) => {
                    index.insert(id, i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while index.keys().any(|id| self.seqs.contains_key(id)) {
            for ev in self.step()? {
                match ev {
                    StepEvent::Token {
                        id,
                        sampled,
                        text_delta,
                    } => {
                        let Some(&i) = index.get(&id) else { continue };
                        let go_on = on_token(&TokenEvent {
                            index: i,
                            sampled: &sampled,
                            text_delta: &text_delta,
                            kv_bytes_in_use: self.kv.bytes_in_use(),
                        });
                        let finished = self.seqs.get(&id).is_none_or(|s| s.finish.is_some());
                        if !go_on
                            && !finished
                            && let Some(out) = self.cancel(id)
                        {
                            results[i] = Some(Ok(out));
                        }
                    }
                    StepEvent::Finished { id, output } => {
                        if let Some(&i) = index.get(&id) {
                            results[i] = Some(Ok(*output));
                        }
                    }
                    StepEvent::Failed { id, error } => {
                        if let Some(&i) = index.get(&id) {
                            results[i] = Some(Err(error));
                        }
                    }
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(EngineError::Internal("request produced no result".into())))
            })
            .collect())
    }
}

/// The ids that end a sequence, assembled here only (the engine, the generator's `Info` and
/// its constraint masks all read this list): the model config's eos ids, then the tokenizer's
/// stop tokens, which already hold `<eos>` and `<end_of_turn>` (the tokenizer looks them up by
/// name in its vocabulary when it loads, whichever file it was built from).
pub fn stop_ids(model: &Gemma3, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids = model.config().text.eos_token_ids.clone();
    for &id in tokenizer.eos_ids() {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// A content hash of image embeddings: sequences with other images never share KV blocks.
fn embeddings_salt(e: &Tensor) -> Result<u128> {
    let mut h = Sha256::new();
    for v in e
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?
    {
        h.update(v.to_le_bytes());
    }
    let d = h.finalize();
    Ok(u128::from_le_bytes(d[..16].try_into().expect("32-byte digest")).max(1))
}

fn count(tokens: &[u32], id: u32) -> usize {
    tokens.iter().filter(|&&t| t == id).count()
}

/// How many of the tokens from `start` the next prefill chunk takes: at most `budget`, never
/// ending inside a run of image tokens (an image's rows attend to each other both ways, so they
/// are computed together; a run longer than the budget is taken whole).
fn chunk_len(tokens: &[u32], start: usize, budget: usize, image: Option<u32>) -> usize {
    let pending = tokens.len() - start;
    let mut end = start + pending.min(budget.max(1));
    let Some(img) = image else {
        return end - start;
    };
    if end < tokens.len() && tokens[end - 1] == img && tokens[end] == img {
        let mut run_start = end - 1;
        while run_start > start && tokens[run_start - 1] == img {
            run_start -= 1;
        }
        if run_start > start {
            end = run_start;
        } else {
            while end < tokens.len() && tokens[end] == img {
                end += 1;
            }
        }
    }
    end - start
}

/// Samples one token for a sequence from its last-row logits and applies the stop rules;
/// returns the token and the new text.
fn sample_next(
    seq: &mut Sequence,
    logits: &Tensor,
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
) -> Result<(Sampled, String)> {
    let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
    if seq.generated().is_empty() && !seq.first_token_ids.is_empty() {
        seq.first_token_logprobs = log_softmax_at(&row, &seq.first_token_ids)?;
    }
    let mask = match seq.constraint.as_mut() {
        Some(c) => Some(c.allowed_tokens()?),
        None => None,
    };
    let sampled = seq.sampler.sample(
        &mut row,
        &seq.tokens,
        &seq.tokens[seq.prompt_len..],
        mask.as_ref(),
    )?;
    let tok = sampled.token;
    if let Some(c) = seq.constraint.as_mut() {
        c.commit(tok)?;
    }
    seq.tokens.push(tok);
    seq.first_token.get_or_insert_with(Instant::now);
    // New whole characters; a stop string ends the text (and the stream) where it starts.
    let before = seq.emitted.len();
    if let Some(delta) = seq.decoder.push(tokenizer, tok)? {
        seq.emitted.push_str(&delta);
    }
    let mut stop = false;
    if let Some(cut) = seq
        .stop_strings
        .iter()
        .filter_map(|s| seq.emitted.find(s.as_str()))
        .min()
    {
        seq.emitted.truncate(cut);
        seq.text_cut = Some(cut);
        stop = true;
    }
    let delta = seq.emitted[before.min(seq.emitted.len())..].to_string();
    seq.logprobs.push(sampled.clone());
    if !seq.ignore_eos && eos_ids.contains(&tok) {
        stop = true;
    }
    if seq.constraint.as_ref().is_some_and(Constraint::is_finished) {
        stop = true;
    }
    seq.finish = if stop {
        Some(FinishReason::Stop)
    } else if seq.generated().len() >= seq.budget {
        Some(FinishReason::Length)
    } else {
        None
    };
    Ok((sampled, delta))
}

#[cfg(test)]
mod tests {
    use super::chunk_len;

    #[test]
    fn chunks_never_split_an_image() {
        const I: u32 = 9;
        let t = [1, 2, I, I, I, I, 3, 4];
        assert_eq!(chunk_len(&t, 0, 4, Some(I)), 2, "stops before the image");
        assert_eq!(
            chunk_len(&t, 2, 2, Some(I)),
            4,
            "an image longer than the budget is whole"
        );
        assert_eq!(chunk_len(&t, 2, 5, Some(I)), 5);
        assert_eq!(
            chunk_len(&t, 0, 6, Some(I)),
            6,
            "ends right after the image"
        );
        assert_eq!(chunk_len(&t, 0, 3, None), 3);
        assert_eq!(chunk_len(&t, 6, 100, Some(I)), 2);
    }
}
