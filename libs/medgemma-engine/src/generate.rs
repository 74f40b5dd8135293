//! The generation loop: prefill, then decode steps over every active sequence in one batched
//! forward call, sampling, stopping (every eos id, stop strings, a completed constraint, the
//! token budget), logprobs, and streaming callbacks.
//!
//! The engine is synchronous and owns the KV cache; services run it on a dedicated thread
//! behind a bounded queue (never on the async runtime).

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use medgemma_model::{Gemma3, KvCache, KvCacheConfig, LogitsRows, SeqInput, SequenceKv};
use medgemma_tokenizer::{IncrementalDecoder, Tokenizer};

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
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// KV cache bytes held by this sequence at its longest.
    pub kv_bytes_peak: usize,
    /// `(id, logprob)` for each of the request's `logprob_token_ids`, in request order, at the
    /// first generated position; empty when none were asked for (or no token was generated).
    pub first_token_logprobs: Vec<(u32, f32)>,
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

/// A loaded model with its tokenizer and KV cache.
pub struct Engine {
    model: Arc<Gemma3>,
    tokenizer: Arc<Tokenizer>,
    kv: KvCache,
    eos_ids: Vec<u32>,
    constraints: Option<Arc<ConstraintFactory>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

struct Active {
    index: usize,
    kv: SequenceKv,
    sampler: Sampler,
    constraint: Option<Constraint>,
    history: Vec<u32>,
    generated: Vec<u32>,
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
    prefill_time: Duration,
    decode_start: Option<Instant>,
    kv_peak: usize,
}

impl Engine {
    /// Wraps a model and tokenizer. Stop ids are the model's eos ids, the tokenizer's, and
    /// `<end_of_turn>` (a chat turn ends with it; stopping on `<eos>` alone runs to the budget).
    pub fn new(model: Arc<Gemma3>, tokenizer: Arc<Tokenizer>, kv: KvCacheConfig) -> Self {
        let mut eos_ids = model.config().text.eos_token_ids.clone();
        for &id in tokenizer.eos_ids() {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        if let Some(id) = tokenizer.token_to_id("<end_of_turn>")
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        let kv = model.new_kv_cache(kv);
        Self {
            model,
            tokenizer,
            kv,
            eos_ids,
            constraints: None,
        }
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

    /// Bytes of KV cache held by sequences now.
    pub fn kv_bytes_in_use(&self) -> usize {
        self.kv.bytes_in_use()
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

    /// Runs one request; `on_token` sees every token and returns `false` to cancel.
    pub fn generate(
        &mut self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<GenerationOutput> {
        let mut out = self.generate_batch(std::slice::from_ref(req), on_token)?;
        out.pop().expect("one request, one result")
    }

    /// Runs several requests together: one packed prefill, then decode steps over all that are
    /// still active, each at its own length. Per-request errors (bad sampling parameters, a
    /// prompt over the context) come back in that request's slot; model failures fail the call.
    pub fn generate_batch(
        &mut self,
        reqs: &[GenerationRequest],
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<Vec<Result<GenerationOutput>>> {
        let ctx = self.model.config().text.max_position_embeddings;
        let mut results: Vec<Option<Result<GenerationOutput>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut active: Vec<Active> = Vec::new();
        for (index, r) in reqs.iter().enumerate() {
            match self.admit(index, r, ctx) {
                Ok(a) => active.push(a),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let res = self.run(reqs, &mut active, &mut results, on_token);
        // Whatever happened, no sequence keeps KV blocks.
        for a in active.iter_mut() {
            self.kv.release(&mut a.kv);
        }
        res?;
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(EngineError::Internal("request produced no result".into())))
            })
            .collect())
    }

    fn admit(&mut self, index: usize, r: &GenerationRequest, ctx: usize) -> Result<Active> {
        if r.prompt_ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if r.prompt_ids.len() >= ctx {
            return Err(EngineError::ContextExceeded {
                prompt_tokens: r.prompt_ids.len(),
                context: ctx,
            });
        }
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
        Ok(Active {
            index,
            kv: self.kv.new_sequence(),
            sampler,
            constraint,
            history: r.prompt_ids.clone(),
            generated: Vec::new(),
            logprobs: Vec::new(),
            first_token_ids: r.logprob_token_ids.clone(),
            first_token_logprobs: Vec::new(),
            budget: r.max_new_tokens.min(ctx - r.prompt_ids.len()),
            stop_strings: r
                .stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            ignore_eos: r.ignore_eos,
            decoder: IncrementalDecoder::new(true),
            emitted: String::new(),
            text_cut: None,
            finish: None,
            prefill_time: Duration::ZERO,
            decode_start: None,
            kv_peak: 0,
        })
    }

    fn run(
        &mut self,
        reqs: &[GenerationRequest],
        active: &mut Vec<Active>,
        results: &mut [Option<Result<GenerationOutput>>],
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<()> {
        // Prefill every admitted sequence in one packed call.
        let t0 = Instant::now();
        let logits = {
            let mut inputs: Vec<SeqInput<'_>> = active
                .iter_mut()
                .map(|a| SeqInput {
                    tokens: &reqs[a.index].prompt_ids,
                    image_embeds: reqs[a.index].image_embeds.as_ref(),
                    logits: if a.budget == 0 {
                        LogitsRows::None
                    } else {
                        LogitsRows::Last
                    },
                    kv: &mut a.kv,
                })
                .collect();
            if inputs.is_empty() {
                return Ok(());
            }
            self.model.forward(&mut self.kv, &mut inputs)?
        };
        for (a, lg) in active.iter_mut().zip(logits) {
            a.kv_peak = a.kv_peak.max(self.kv.bytes_in_use());
            match lg {
                Some(lg) => self.step(a, &lg, on_token)?,
                None => a.finish = Some(FinishReason::Length),
            }
            a.prefill_time = t0.elapsed();
            a.decode_start = Some(Instant::now());
        }
        self.retire(active, results)?;
        // Decode: one token per active sequence per forward call.
        while !active.is_empty() {
            let last: Vec<[u32; 1]> = active
                .iter()
                .map(|a| [*a.generated.last().expect("sampled")])
                .collect();
            let logits = {
                let mut inputs: Vec<SeqInput<'_>> = active
                    .iter_mut()
                    .zip(&last)
                    .map(|(a, t)| SeqInput {
                        kv: &mut a.kv,
                        tokens: t,
                        image_embeds: None,
                        logits: LogitsRows::Last,
                    })
                    .collect();
                self.model.forward(&mut self.kv, &mut inputs)?
            };
            let in_use = self.kv.bytes_in_use();
            for (a, lg) in active.iter_mut().zip(logits) {
                a.kv_peak = a.kv_peak.max(in_use);
                let lg = lg.ok_or_else(|| {
                    EngineError::Internal("decode step returned no logits".into())
                })?;
                self.step(a, &lg, on_token)?;
            }
            self.retire(active, results)?;
        }
        Ok(())
    }

    /// Samples one token for a sequence from its last-row logits and applies stop rules.
    fn step(
        &self,
        a: &mut Active,
        logits: &Tensor,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<()> {
        let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        if a.generated.is_empty() && !a.first_token_ids.is_empty() {
            a.first_token_logprobs = log_softmax_at(&row, &a.first_token_ids)?;
        }
        let mask = match a.constraint.as_mut() {
            Some(c) => Some(c.allowed_tokens()?),
            None => None,
        };
        let sampled = a
            .sampler
            .sample(&mut row, &a.history, &a.generated, mask.as_ref())?;
        let tok = sampled.token;
        if let Some(c) = a.constraint.as_mut() {
            c.commit(tok)?;
        }
        a.generated.push(tok);
        a.history.push(tok);
        // New whole characters; a stop string ends the text (and the stream) where it starts.
        let before = a.emitted.len();
        if let Some(delta) = a.decoder.push(&self.tokenizer, tok)? {
            a.emitted.push_str(&delta);
        }
        let mut stop = false;
        if let Some(cut) = a
            .stop_strings
            .iter()
            .filter_map(|s| a.emitted.find(s.as_str()))
            .min()
        {
            a.emitted.truncate(cut);
            a.text_cut = Some(cut);
            stop = true;
        }
        let delta = a.emitted[before.min(a.emitted.len())..].to_string();
        let keep_going = on_token(&TokenEvent {
            index: a.index,
            sampled: &sampled,
            text_delta: &delta,
            kv_bytes_in_use: self.kv.bytes_in_use(),
        });
        a.logprobs.push(sampled);
        if !a.ignore_eos && self.eos_ids.contains(&tok) {
            stop = true;
        }
        if a.constraint.as_ref().is_some_and(Constraint::is_finished) {
            stop = true;
        }
        a.finish = if !keep_going {
            Some(FinishReason::Cancelled)
        } else if stop {
            Some(FinishReason::Stop)
        } else if a.generated.len() >= a.budget {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(())
    }

    fn retire(
        &mut self,
        active: &mut Vec<Active>,
        results: &mut [Option<Result<GenerationOutput>>],
    ) -> Result<()> {
        let mut i = 0;
        while i < active.len() {
            if active[i].finish.is_none() {
                i += 1;
                continue;
            }
            let mut a = active.swap_remove(i);
            self.kv.release(&mut a.kv);
            let mut text = self.tokenizer.decode(&a.generated, true)?;
            if let Some(cut) = a.text_cut {
                text.truncate(cut);
            }
            let prompt_len = a.history.len() - a.generated.len();
            let mut prompt = a.history;
            prompt.truncate(prompt_len);
            results[a.index] = Some(Ok(GenerationOutput {
                prompt_token_ids: prompt,
                token_ids: a.generated,
                text,
                finish_reason: a.finish.expect("checked above"),
                logprobs: a.logprobs,
                prefill_time: a.prefill_time,
                decode_time: a.decode_start.map(|t| t.elapsed()).unwrap_or_default(),
                kv_bytes_peak: a.kv_peak,
                first_token_logprobs: a.first_token_logprobs,
            }));
        }
        Ok(())
    }
}
