//! Next-token sampling.
//!
//! [`Sampler::sample`] turns one row of logits into a token. The logits
//! processors run in the HF / vLLM order:
//!
//! 1. **repetition penalty** (HF semantics) over every distinct token of
//!    `prompt_and_generated`: a positive logit is divided by the penalty, a
//!    negative one multiplied by it;
//! 2. **frequency / presence penalties** (OpenAI semantics) over `generated`:
//!    `logit -= count * frequency_penalty + (count > 0) * presence_penalty`;
//! 3. **mask**: tokens not in the [`TokenMask`] (e.g. from a grammar
//!    constraint) get `-inf`;
//! 4. **temperature**: logits are divided by `temperature`;
//! 5. **top-k**, 6. **top-p** (nucleus, renormalised over what top-k kept),
//!    7. **min-p** (drop tokens whose probability is below
//!    `min_p * max_probability`);
//! 8. draw one token from the renormalised survivors with the sampler's
//!    seeded RNG.
//!
//! Greedy decoding (`temperature == 0`, or anything below
//! [`GREEDY_TEMPERATURE_EPSILON`]) is the exact argmax of the logits after
//! steps 1-3, ties going to the lowest token id; it ignores top-k/top-p/min-p
//! and does not consume the RNG.
//!
//! # Reported log-probabilities
//!
//! [`Sampled::logprob`] and [`Sampled::top`] are *processed* log-probabilities
//! (what vLLM calls `processed_logprobs`): the log-softmax over the whole
//! vocabulary of the logits after penalties, mask and temperature, **before**
//! top-k / top-p / min-p truncation. Masked tokens therefore have probability
//! zero, and a token that survived truncation reports its probability under
//! the untruncated (but tempered) distribution. For greedy decoding the
//! temperature is taken as 1.
//!
//! # Reproducibility
//!
//! The RNG is [`ChaCha8Rng`] seeded with [`ChaCha8Rng::seed_from_u64`], whose
//! output is specified and portable, and every non-greedy step consumes
//! exactly one `f64` draw. With the same seed, parameters and logits the
//! sampled sequence is identical across runs and platforms.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Temperatures at or below this are treated as greedy (as in vLLM).
pub const GREEDY_TEMPERATURE_EPSILON: f32 = 1e-5;

/// Largest accepted [`SamplingParams::top_logprobs`] (the OpenAI API limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Nucleus search histogram: buckets of `max_logit - logit` over `[0, NUCLEUS_SPAN)`
/// (weights down to `e^-32`), plus one overflow bucket.
const NUCLEUS_BUCKETS: usize = 1024;
/// Top-p first tries the nucleus within this many best tokens.
const NUCLEUS_FAST_PATH: usize = 64;
const NUCLEUS_SPAN: f32 = 32.0;

/// Errors from sampling parameter validation and from [`Sampler::sample`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A [`SamplingParams`] field is out of range or not a number.
    #[error("invalid sampling parameter `{name}`: {reason}")]
    InvalidParam {
        /// Field name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The logits row is empty.
    #[error("logits row is empty")]
    EmptyLogits,
    /// The logits row has more entries than a `u32` token id can address.
    #[error("logits row has {0} entries, more than u32 token ids can address")]
    LogitsTooLarge(usize),
    /// A logit is NaN or +infinity (before or after temperature scaling).
    #[error("logit of token {token} is NaN or +infinity")]
    NonFiniteLogit {
        /// Offending token id.
        token: u32,
    },
    /// The token mask and the logits row disagree on the vocabulary size.
    #[error("token mask covers {mask} tokens but the logits row has {logits}")]
    MaskSizeMismatch {
        /// Mask length.
        mask: usize,
        /// Logits length.
        logits: usize,
    },
    /// Every token is masked out or has a `-inf` logit.
    #[error("no token can be sampled: all are masked out or have -inf logits")]
    NoAllowedTokens,
}

/// Per-request sampling configuration. `Default` is greedy with seed 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` (or below [`GREEDY_TEMPERATURE_EPSILON`]) is greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` = off). `Some(0)` is invalid.
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in `(0, 1]`; `1.0` = off.
    pub top_p: f32,
    /// Min-p in `[0, 1]`; `0.0` = off.
    pub min_p: f32,
    /// HF repetition penalty (`> 0`); `1.0` = off.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty in `[-2, 2]`; `0.0` = off.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty in `[-2, 2]`; `0.0` = off.
    pub presence_penalty: f32,
    /// RNG seed.
    pub seed: u64,
    /// How many most likely alternatives to report per step (`0..=MAX_TOP_LOGPROBS`).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            top_logprobs: 0,
        }
    }
}

/// One sampling setting out of range: the field and what is wrong with it (never its context).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamViolation {
    /// Field name, as in [`SamplingParams`].
    pub name: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl From<ParamViolation> for SamplingError {
    fn from(v: ParamViolation) -> Self {
        SamplingError::InvalidParam {
            name: v.name,
            reason: v.reason,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (same as `Default`).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether these parameters decode greedily.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= GREEDY_TEMPERATURE_EPSILON
    }

    /// The first out-of-range field, as an error; see [`SamplingParams::violations`].
    pub fn validate(&self) -> Result<(), SamplingError> {
        match self.violations().into_iter().next() {
            Some(v) => Err(v.into()),
            None => Ok(()),
        }
    }

    /// Every out-of-range field (NaN and infinite values included), in field order. The one
    /// set of rules for sampling settings: the services' edges turn these into
    /// `google.rpc.BadRequest` field violations, [`Sampler::new`] refuses the first.
    pub fn violations(&self) -> Vec<ParamViolation> {
        let mut out = Vec::new();
        let mut bad = |name, reason: String| out.push(ParamViolation { name, reason });
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            bad("temperature", format!("must be finite and >= 0, got {t}"));
        }
        let p = self.top_p;
        if !p.is_finite() || p <= 0.0 || p > 1.0 {
            bad("top_p", format!("must be in (0, 1], got {p}"));
        }
        if self.top_k == Some(0) {
            bad("top_k", "must be >= 1 (leave it unset for no top-k)".into());
        }
        let m = self.min_p;
        if !m.is_finite() || !(0.0..=1.0).contains(&m) {
            bad("min_p", format!("must be in [0, 1], got {m}"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            bad(
                "repetition_penalty",
                format!("must be finite and > 0, got {r}"),
            );
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                bad(name, format!("must be in [-2, 2], got {v}"));
            }
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            bad(
                "top_logprobs",
                format!("must be <= {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs),
            );
        }
        out
    }
}

/// A set of allowed token ids over a vocabulary of fixed length (a bitset).
///
/// Bit `i` lives in `words()[i / 32]` at bit `i % 32`, the same layout as
/// llguidance's `SimpleVob`. Ids at or beyond [`TokenMask::len`] are never
/// allowed.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
    len: usize,
}

impl fmt::Debug for TokenMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenMask")
            .field("len", &self.len)
            .field("allowed", &self.count_allowed())
            .finish()
    }
}

impl TokenMask {
    /// A mask of `len` tokens with nothing allowed.
    pub fn none(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(32)],
            len,
        }
    }

    /// A mask of `len` tokens with everything allowed.
    pub fn all(len: usize) -> Self {
        Self::from_words(vec![u32::MAX; len.div_ceil(32)], len)
    }

    /// Builds a mask from raw words (see the type docs for the layout).
    /// `words` is truncated or zero-padded to `len` bits; bits past `len` are cleared.
    pub fn from_words(mut words: Vec<u32>, len: usize) -> Self {
        words.resize(len.div_ceil(32), 0);
        let tail = len % 32;
        if tail != 0
            && let Some(last) = words.last_mut()
        {
            *last &= (1u32 << tail) - 1;
        }
        Self { words, len }
    }

    /// Vocabulary size covered by the mask.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask covers zero tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw words (see the type docs for the layout).
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// Whether `token` is allowed; `false` for ids out of range.
    #[inline]
    pub fn is_allowed(&self, token: u32) -> bool {
        let i = token as usize;
        i < self.len && self.words[i / 32] & (1 << (i % 32)) != 0
    }

    /// Allows `token`; ids out of range are ignored.
    pub fn allow(&mut self, token: u32) {
        let i = token as usize;
        if i < self.len {
            self.words[i / 32] |= 1 << (i % 32);
        }
    }

    /// Disallows `token`; ids out of range are ignored.
    pub fn disallow(&mut self, token: u32) {
        let i = token as usize;
        if i < self.len {
            self.words[i / 32] &= !(1 << (i % 32));
        }
    }

    /// Number of allowed tokens.
    pub fn count_allowed(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Allowed token ids in increasing order.
    pub fn iter_allowed(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let base = (wi * 32) as u32;
            BitIter(w).map(move |b| base + b)
        })
    }
}

struct BitIter(u32);

impl Iterator for BitIter {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            None
        } else {
            let b = self.0.trailing_zeros();
            self.0 &= self.0 - 1;
            Some(b)
        }
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token id.
    pub token: u32,
    /// Its processed log-probability (see the module docs).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the same distribution, best
    /// first (ties: lower id first); tokens with probability zero are omitted.
    pub top: Vec<(u32, f32)>,
}

/// A seeded sampler for one sequence. Reuses scratch buffers between steps.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// `exp(logit - max)` per token, refilled each step.
    weights: Vec<f32>,
    /// Bitset scratch for the repetition penalty.
    seen: Vec<u64>,
    /// Sort scratch for frequency/presence counts.
    counts: Vec<u32>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// A token ranked by logit, higher first, ties to the lower id.
#[derive(Clone, Copy)]
struct Ranked {
    logit: f32,
    id: u32,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    /// `Greater` means "better": higher logit, or same logit and lower id.
    fn cmp(&self, other: &Self) -> Ordering {
        self.logit
            .total_cmp(&other.logit)
            .then_with(|| other.id.cmp(&self.id))
    }
}

/// The `k` best tokens with a finite logit (or fewer), best first.
/// One pass with a size-`k` min-heap; once it is full, 64-token chunks whose
/// (vectorised) maximum cannot beat the heap's worst entry are skipped.
fn top_n(logits: &[f32], k: usize) -> Vec<u32> {
    use std::cmp::Reverse;
    const CHUNK: usize = 64;
    if k == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(k + 1);
    // Logit of the worst kept token once the heap is full.
    let mut floor = f32::NEG_INFINITY;
    for (ci, chunk) in logits.chunks(CHUNK).enumerate() {
        // Later ids lose ties, so a chunk whose best does not beat the floor is skipped.
        if heap.len() == k && max_lanes(chunk) <= floor {
            continue;
        }
        for (j, &logit) in chunk.iter().enumerate() {
            if logit == f32::NEG_INFINITY {
                continue;
            }
            let r = Ranked {
                logit,
                id: (ci * CHUNK + j) as u32,
            };
            if heap.len() < k {
                heap.push(Reverse(r));
            } else if let Some(mut worst) = heap.peek_mut()
                && r > worst.0
            {
                *worst = Reverse(r);
            } else {
                continue;
            }
            if heap.len() == k {
                floor = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.logit);
            }
        }
    }
    // Ascending in `Reverse` = descending in `Ranked` = best first.
    heap.into_sorted_vec().into_iter().map(|r| r.0.id).collect()
}

/// Smallest best-first prefix whose mass reaches `target` (at least one token).
fn nucleus_prefix(mut sorted: Vec<u32>, weights: &[f32], target: f64) -> Vec<u32> {
    let mut acc = 0.0f64;
    let mut keep = sorted.len();
    for (i, &id) in sorted.iter().enumerate() {
        if acc >= target && i > 0 {
            keep = i;
            break;
        }
        acc += f64::from(weights[id as usize]);
    }
    sorted.truncate(keep.max(1));
    sorted
}

/// Nucleus over the whole vocabulary without a full sort: one pass buckets the
/// tokens by `max - logit` (monotone in rank) and sums their weights; a second
/// keeps every bucket before the one where the mass crosses `target` and ranks
/// only that boundary bucket. Exact: every token left out ranks below every
/// token kept. The result is not sorted (sampling does not need it to be).
fn nucleus_of_all(logits: &[f32], weights: &[f32], max: f32, target: f64) -> Vec<u32> {
    let scale = NUCLEUS_BUCKETS as f32 / NUCLEUS_SPAN;
    let bucket = |l: f32| (((max - l) * scale) as usize).min(NUCLEUS_BUCKETS);
    let mut mass = vec![0.0f64; NUCLEUS_BUCKETS + 1];
    for (&l, &w) in logits.iter().zip(weights) {
        if w > 0.0 {
            mass[bucket(l)] += f64::from(w);
        }
    }
    let mut acc = 0.0;
    let mut last = NUCLEUS_BUCKETS;
    for (b, m) in mass.iter().enumerate() {
        acc += m;
        if acc >= target {
            last = b;
            break;
        }
    }
    // Buckets before `last` are entirely inside the nucleus (any order will do);
    // only the boundary bucket needs ranking. Its tokens are collected in id
    // order, so a stable sort by logit yields `Ranked` order (and is linear on ties).
    let mut nucleus = Vec::new();
    let mut boundary: Vec<Ranked> = Vec::new();
    let mut acc = 0.0f64;
    for (i, (&logit, &w)) in logits.iter().zip(weights).enumerate() {
        if w <= 0.0 {
            continue;
        }
        match bucket(logit).cmp(&last) {
            Ordering::Less => {
                nucleus.push(i as u32);
                acc += f64::from(w);
            }
            Ordering::Equal => boundary.push(Ranked {
                logit,
                id: i as u32,
            }),
            Ordering::Greater => {}
        }
    }
    boundary.sort_by(|a, b| b.logit.total_cmp(&a.logit));
    for r in boundary {
        if acc >= target && !nucleus.is_empty() {
            break;
        }
        nucleus.push(r.id);
        acc += f64::from(weights[r.id as usize]);
    }
    nucleus
}

/// Draws from `ids` with probability proportional to `weights[id]`, skipping
/// ids whose weight is below `min_weight` or zero.
fn pick(
    ids: impl Iterator<Item = u32> + Clone,
    weights: &[f32],
    min_weight: f32,
    rng: &mut ChaCha8Rng,
) -> Option<u32> {
    let keep = |id: &u32| {
        let w = weights[*id as usize];
        w > 0.0 && w >= min_weight
    };
    let total: f64 = ids
        .clone()
        .filter(keep)
        .map(|id| f64::from(weights[id as usize]))
        .sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0f64;
    let mut last = None;
    for id in ids.filter(keep) {
        acc += f64::from(weights[id as usize]);
        last = Some(id);
        if u < acc {
            return Some(id);
        }
    }
    // Only reachable through rounding: fall back to the last candidate.
    last
}

impl Sampler {
    /// Validates `params` and seeds the RNG with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            weights: Vec::new(),
            seen: Vec::new(),
            counts: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples the next token from one row of logits (length = model vocab).
    ///
    /// `logits` is overwritten with the processed logits (after penalties,
    /// mask and temperature). `prompt_and_generated` feeds the repetition
    /// penalty, `generated` the frequency/presence penalties; ids out of the
    /// vocabulary range are ignored there. `allowed`, when given, must have
    /// the same length as `logits`; tokens outside it are never chosen.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt_and_generated: &[u32],
        generated: &[u32],
        allowed: Option<&TokenMask>,
    ) -> Result<Sampled, SamplingError> {
        let n = logits.len();
        if n == 0 {
            return Err(SamplingError::EmptyLogits);
        }
        if u32::try_from(n).is_err() {
            return Err(SamplingError::LogitsTooLarge(n));
        }
        if let Some(i) = first_nan_or_pos_inf(logits) {
            return Err(SamplingError::NonFiniteLogit { token: i as u32 });
        }
        if let Some(mask) = allowed
            && mask.len() != n
        {
            return Err(SamplingError::MaskSizeMismatch {
                mask: mask.len(),
                logits: n,
            });
        }

        self.apply_repetition_penalty(logits, prompt_and_generated);
        self.apply_frequency_presence(logits, generated);
        if let Some(mask) = allowed {
            apply_mask(logits, mask);
        }
        let greedy = self.params.is_greedy();
        let t = self.params.temperature;
        if !greedy && t != 1.0 {
            for l in logits.iter_mut() {
                *l /= t;
            }
        }

        // Argmax (ties -> lowest id) and validity after temperature.
        let (best, max) = argmax(logits);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoAllowedTokens);
        }
        if !max.is_finite() {
            return Err(SamplingError::NonFiniteLogit { token: best as u32 });
        }

        // Unnormalised probabilities relative to the max token (weight 1).
        // Fill then sum: a fused exp + f64 sum does not vectorise as well.
        self.weights.clear();
        self.weights
            .extend(logits.iter().map(|&l| exp_nonpos(l - max)));
        let total = lane_sum(&self.weights, |w| w);
        let token = if greedy {
            best as u32
        } else {
            self.draw(logits, max, total)
                .ok_or(SamplingError::NoAllowedTokens)?
        };
        let log_z = f64::from(max) + total.ln();

        let logprob_of = |id: u32| (f64::from(logits[id as usize]) - log_z) as f32;
        let top = top_n(logits, self.params.top_logprobs)
            .into_iter()
            .map(|id| (id, logprob_of(id)))
            .collect();
        Ok(Sampled {
            token,
            logprob: logprob_of(token),
            top,
        })
    }

    fn apply_repetition_penalty(&mut self, logits: &mut [f32], ids: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || ids.is_empty() {
            return;
        }
        let n = logits.len();
        self.seen.clear();
        self.seen.resize(n.div_ceil(64), 0);
        for &id in ids {
            let i = id as usize;
            if i >= n {
                continue;
            }
            let (w, b) = (i / 64, 1u64 << (i % 64));
            if self.seen[w] & b != 0 {
                continue;
            }
            self.seen[w] |= b;
            let l = &mut logits[i];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }

    fn apply_frequency_presence(&mut self, logits: &mut [f32], generated: &[u32]) {
        let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
        if (freq == 0.0 && pres == 0.0) || generated.is_empty() {
            return;
        }
        let n = logits.len();
        self.counts.clear();
        self.counts
            .extend(generated.iter().copied().filter(|&id| (id as usize) < n));
        self.counts.sort_unstable();
        for run in self.counts.chunk_by(|a, b| a == b) {
            let count = run.len() as f32;
            logits[run[0] as usize] -= count * freq + pres;
        }
    }

    /// Top-k -> top-p -> min-p -> categorical draw. Consumes one RNG draw.
    fn draw(&mut self, logits: &[f32], max: f32, total: f64) -> Option<u32> {
        let n = logits.len();
        let weights = &self.weights;
        // `None` = every token, in id order.
        let mut candidates: Option<Vec<u32>> = match self.params.top_k {
            Some(k) if k < n => Some(top_n(logits, k)),
            Some(_) | None => None,
        };
        let top_p = self.params.top_p;
        if top_p < 1.0 {
            let sorted = match candidates {
                Some(sorted) => {
                    let mass: f64 = sorted
                        .iter()
                        .map(|&id| f64::from(weights[id as usize]))
                        .sum();
                    nucleus_prefix(sorted, weights, mass * f64::from(top_p))
                }
                None => {
                    // Peaked distributions: the nucleus is usually among the few best.
                    let target = total * f64::from(top_p);
                    let few = top_n(logits, NUCLEUS_FAST_PATH.min(n));
                    let mass: f64 = few.iter().map(|&id| f64::from(weights[id as usize])).sum();
                    if mass >= target {
                        nucleus_prefix(few, weights, target)
                    } else {
                        nucleus_of_all(logits, weights, max, target)
                    }
                }
            };
            candidates = Some(sorted);
        }
        // The best token has weight exactly 1, so min-p is a weight threshold.
        let min_weight = self.params.min_p;
        match candidates {
            Some(ids) => pick(ids.iter().copied(), weights, min_weight, &mut self.rng),
            None => pick_dense(weights, min_weight, &mut self.rng),
        }
    }
}

/// `exp(x)` for `x <= 0` (including `-inf`), without libm: Cephes' `expf`
/// polynomial after range reduction, relative error below 1e-6. Branch-free
/// so the per-vocabulary loops vectorise, and bit-identical on every platform
/// (plain IEEE mul/add), which keeps seeded sampling reproducible.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let nf = shifted - ROUND;
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - nf * LN2_HI - nf * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // n is in [-126, 0], so 2^n is a normal float.
    let scaled = p * f32::from_bits((n.wrapping_add(127) as u32) << 23);
    if x < -87.0 { 0.0 } else { scaled }
}

/// Lanes for the vectorisable whole-vocabulary reductions below.
const LANES: usize = 16;

/// `sum(f(x))` in `f64` with independent lane accumulators (vectorises; a
/// single running sum is a serial dependency chain). Deterministic.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(f(x));
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&x| f64::from(f(x))).sum::<f64>()
}

/// Index of the first NaN or +inf logit (`-inf` is a legitimate "impossible").
fn first_nan_or_pos_inf(logits: &[f32]) -> Option<usize> {
    const POS_INF: u32 = 0x7f80_0000;
    let bad = |x: f32| {
        let bits = x.to_bits();
        bits & 0x7fff_ffff > POS_INF || bits == POS_INF
    };
    let mut any = [false; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in any.iter_mut().zip(c) {
            *a |= bad(x);
        }
    }
    if any.iter().any(|&a| a) || tail.iter().any(|&x| bad(x)) {
        logits.iter().position(|&x| bad(x))
    } else {
        None
    }
}

/// Largest value (NaN-free input; `-inf` for an empty slice).
#[inline]
fn max_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Largest logit and its lowest index (NaN-free input).
fn argmax(logits: &[f32]) -> (usize, f32) {
    let max = max_lanes(logits);
    let best = logits.iter().position(|&x| x == max).unwrap_or(0);
    (best, max)
}

/// Draws a token id with probability proportional to `weights[id]` over the
/// whole vocabulary, skipping weights below `min_weight` or zero. Blocks of
/// 1024 are summed first (vectorised), then only the chosen block is walked.
fn pick_dense(weights: &[f32], min_weight: f32, rng: &mut ChaCha8Rng) -> Option<u32> {
    const BLOCK: usize = 1024;
    let kept = |w: f32| if w > 0.0 && w >= min_weight { w } else { 0.0 };
    let blocks: Vec<f64> = weights.chunks(BLOCK).map(|b| lane_sum(b, kept)).collect();
    let total: f64 = blocks.iter().sum();
    let mut u = rng.random::<f64>() * total;
    let mut last_block = None;
    for (bi, &mass) in blocks.iter().enumerate() {
        if mass <= 0.0 {
            continue;
        }
        last_block = Some(bi);
        if u >= mass {
            u -= mass;
            continue;
        }
        let base = bi * BLOCK;
        let block = &weights[base..(base + BLOCK).min(weights.len())];
        let mut acc = 0.0f64;
        for (i, &w) in block.iter().enumerate() {
            let w = kept(w);
            if w > 0.0 {
                acc += f64::from(w);
                if u < acc {
                    return Some((base + i) as u32);
                }
            }
        }
        // Rounding between the lane sum and this walk: fall through to the fallback.
        break;
    }
    // Only reachable through rounding: the last kept token of the last block visited.
    let bi = last_block?;
    let base = bi * BLOCK;
    weights[base..(base + BLOCK).min(weights.len())]
        .iter()
        .rposition(|&w| kept(w) > 0.0)
        .map(|i| (base + i) as u32)
}

fn apply_mask(logits: &mut [f32], mask: &TokenMask) {
    for (chunk, &word) in logits.chunks_mut(32).zip(mask.words()) {
        if word == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if word & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_orders_and_breaks_ties() {
        let logits = [1.0, 3.0, f32::NEG_INFINITY, 3.0, 2.0];
        assert_eq!(top_n(&logits, 3), vec![1, 3, 4]);
        assert_eq!(top_n(&logits, 10), vec![1, 3, 4, 0]);
        assert!(top_n(&logits, 0).is_empty());
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut x = 0.0f32;
        while x > -90.0 {
            let (fast, exact) = (exp_nonpos(x), x.exp());
            if x > -87.0 {
                assert!(
                    ((fast - exact) / exact).abs() < 1e-6,
                    "exp({x}) = {fast}, want {exact}"
                );
            }
            assert!((0.0..=1.0).contains(&fast));
            x -= 0.001_37;
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-1000.0), 0.0);
    }

    #[test]
    fn mask_words_round_trip() {
        let mut m = TokenMask::none(70);
        m.allow(0);
        m.allow(33);
        m.allow(69);
        m.allow(70); // out of range, ignored
        assert_eq!(m.iter_allowed().collect::<Vec<_>>(), vec![0, 33, 69]);
        assert_eq!(m.count_allowed(), 3);
        let all = TokenMask::all(70);
        assert_eq!(all.count_allowed(), 70);
        assert!(!all.is_allowed(70));
        let copy = TokenMask::from_words(all.words().to_vec(), 40);
        assert_eq!(copy.count_allowed(), 40);
    }
}
