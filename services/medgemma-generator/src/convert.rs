//! The edge of the generator: each `medgemma.generation.v1` message becomes the engine's type
//! through its own `TryFrom` (sampling, constraint, request). A conversion collects every
//! problem it finds as a `google.rpc.BadRequest` field violation, and the request's conversion
//! gathers those of its parts, so a caller learns about all of them at once.

use candle_core::{Device, Tensor};
use medgemma_engine::constraint::ConstraintSpec;
use medgemma_engine::generate::GenerationRequest;
use medgemma_engine::sampling::{MAX_TOP_LOGPROBS, SamplingParams};
use medgemma_proto::generation::v1 as pb;
use medgemma_rpc::FieldViolation;

use crate::config::GeneratorConfig;

/// Most stop strings per request, and their longest length in bytes.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_STRING_BYTES: usize = 256;
/// Most ids in `logprob_token_ids`.
const MAX_LOGPROB_TOKEN_IDS: usize = 256;

/// Every problem one message has.
pub(crate) type Violations = Vec<FieldViolation>;

/// What requests are checked against.
#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    pub context_length: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub image_token_id: Option<u32>,
    pub tokens_per_image: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A validated request and what the response needs from it.
pub(crate) struct Submitted {
    pub request: GenerationRequest,
    pub want_logprobs: bool,
}

/// A `GenerateRequest` with what it is checked against.
pub(crate) struct Incoming<'a> {
    pub request: pb::GenerateRequest,
    pub info: &'a ModelInfo,
    pub config: &'a GeneratorConfig,
}

/// A request's `SamplingParams`: the engine's settings (without `top_logprobs`, a request
/// field) and the token budget, if set.
pub(crate) struct Sampling {
    pub params: SamplingParams,
    pub max_new_tokens: Option<u32>,
}

/// A request's `Constraint`, parsed (its size limit is the request's to check).
pub(crate) struct Constraint(pub ConstraintSpec);

/// Moves the violations of a part's conversion into the request's list.
fn part<T>(converted: Result<T, Violations>, v: &mut Violations) -> Option<T> {
    converted.map_err(|mut e| v.append(&mut e)).ok()
}

impl TryFrom<pb::SamplingParams> for Sampling {
    type Error = Violations;

    /// Unset fields take the engine's defaults; the engine's rules judge the set ones.
    fn try_from(s: pb::SamplingParams) -> Result<Self, Violations> {
        let defaults = SamplingParams::default();
        let params = SamplingParams {
            temperature: s.temperature.unwrap_or(defaults.temperature),
            top_k: s.top_k.map(|k| k as usize),
            top_p: s.top_p.unwrap_or(defaults.top_p),
            min_p: s.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: s.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            frequency_penalty: s.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: s.presence_penalty.unwrap_or(defaults.presence_penalty),
            seed: s.seed.unwrap_or(defaults.seed),
            top_logprobs: 0,
        };
        let mut v: Violations = params
            .violations()
            .into_iter()
            .map(|p| FieldViolation::new(format!("sampling.{}", p.name), p.reason))
            .collect();
        if s.max_new_tokens == Some(0) {
            v.push(FieldViolation::new(
                "sampling.max_new_tokens",
                "must be at least 1",
            ));
        }
        if !v.is_empty() {
            return Err(v);
        }
        Ok(Self {
            params,
            max_new_tokens: s.max_new_tokens,
        })
    }
}

impl TryFrom<pb::constraint::Kind> for Constraint {
    type Error = Violations;

    fn try_from(kind: pb::constraint::Kind) -> Result<Self, Violations> {
        match kind {
            pb::constraint::Kind::JsonSchema(text) => {
                serde_json::from_str::<serde_json::Value>(&text)
                    .map(|schema| Self(ConstraintSpec::JsonSchema(schema)))
                    .map_err(|_| {
                        vec![FieldViolation::new(
                            "constraint.json_schema",
                            "is not valid JSON",
                        )]
                    })
            }
            pb::constraint::Kind::Regex(re) if re.is_empty() => Err(vec![FieldViolation::new(
                "constraint.regex",
                "must not be empty",
            )]),
            pb::constraint::Kind::Regex(re) => Ok(Self(ConstraintSpec::Regex(re))),
        }
    }
}

impl TryFrom<Incoming<'_>> for Submitted {
    type Error = Violations;

    /// `GenerateRequest` -> the engine's request, every field checked; all violations at once.
    fn try_from(incoming: Incoming<'_>) -> Result<Self, Violations> {
        let Incoming {
            request: req,
            info,
            config,
        } = incoming;
        let mut v = Vec::new();
        check_prompt(&req.prompt_ids, info, &mut v);
        let sampling = part(Sampling::try_from(req.sampling.unwrap_or_default()), &mut v);
        if let Some(n) = sampling
            .as_ref()
            .and_then(|s| s.max_new_tokens)
            .filter(|&n| n > config.max_new_tokens_limit)
        {
            v.push(FieldViolation::new(
                "sampling.max_new_tokens",
                format!(
                    "{n} is over the limit of {} (--max-new-tokens-limit)",
                    config.max_new_tokens_limit
                ),
            ));
        }
        check_logprobs(&req, info, &mut v);
        check_stop_strings(&req.stop_strings, &mut v);
        let constraint = constraint(req.constraint, config.max_constraint_bytes, &mut v);
        let image_embeds = image_embeds(&req.image_embeddings, &req.prompt_ids, info, &mut v);
        let Some(Sampling {
            params: mut sampling,
            max_new_tokens,
        }) = sampling.filter(|_| v.is_empty())
        else {
            return Err(v);
        };
        sampling.top_logprobs = req.top_logprobs.unwrap_or(0) as usize;
        // The engine's own checks, as field violations.
        if let Err(medgemma_engine::sampling::SamplingError::InvalidParam { name, reason }) =
            sampling.validate()
        {
            return Err(vec![FieldViolation::new(
                format!("sampling.{name}"),
                reason,
            )]);
        }
        Ok(Submitted {
            request: GenerationRequest {
                prompt_ids: req.prompt_ids,
                image_embeds,
                sampling,
                max_new_tokens: max_new_tokens.unwrap_or(config.default_max_new_tokens) as usize,
                stop_strings: req.stop_strings,
                ignore_eos: req.ignore_eos,
                constraint: constraint.map(|c| c.0),
                logprob_token_ids: req.logprob_token_ids,
            },
            want_logprobs: req.top_logprobs.is_some(),
        })
    }
}

fn check_prompt(prompt_ids: &[u32], info: &ModelInfo, v: &mut Violations) {
    if prompt_ids.is_empty() {
        v.push(FieldViolation::new("prompt_ids", "must not be empty"));
    } else if prompt_ids.len() >= info.context_length {
        v.push(FieldViolation::new(
            "prompt_ids",
            format!(
                "{} tokens do not fit the model's context of {} tokens",
                prompt_ids.len(),
                info.context_length
            ),
        ));
    }
    if let Some(i) = prompt_ids
        .iter()
        .position(|&id| id as usize >= info.vocab_size && Some(id) != info.image_token_id)
    {
        v.push(FieldViolation::new(
            format!("prompt_ids[{i}]"),
            format!("is outside the vocabulary (size {})", info.vocab_size),
        ));
    }
}

fn check_logprobs(req: &pb::GenerateRequest, info: &ModelInfo, v: &mut Violations) {
    if req.top_logprobs.unwrap_or(0) as usize > MAX_TOP_LOGPROBS {
        v.push(FieldViolation::new(
            "top_logprobs",
            format!("must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    if req.logprob_token_ids.len() > MAX_LOGPROB_TOKEN_IDS {
        v.push(FieldViolation::new(
            "logprob_token_ids",
            format!("at most {MAX_LOGPROB_TOKEN_IDS} ids"),
        ));
    }
    if let Some(i) = req
        .logprob_token_ids
        .iter()
        .position(|&id| id as usize >= info.vocab_size)
    {
        v.push(FieldViolation::new(
            format!("logprob_token_ids[{i}]"),
            format!("is outside the vocabulary (size {})", info.vocab_size),
        ));
    }
}

fn check_stop_strings(stop_strings: &[String], v: &mut Violations) {
    if stop_strings.len() > MAX_STOP_STRINGS {
        v.push(FieldViolation::new(
            "stop_strings",
            format!("at most {MAX_STOP_STRINGS}"),
        ));
    }
    if let Some(i) = stop_strings
        .iter()
        .position(|s| s.len() > MAX_STOP_STRING_BYTES)
    {
        v.push(FieldViolation::new(
            format!("stop_strings[{i}]"),
            format!("longer than {MAX_STOP_STRING_BYTES} bytes"),
        ));
    }
}

/// The request's constraint: its size checked against `--max-constraint-bytes` before it is
/// parsed.
fn constraint(
    c: Option<pb::Constraint>,
    max_bytes: usize,
    v: &mut Violations,
) -> Option<Constraint> {
    let kind = c.and_then(|c| c.kind)?;
    let (pb::constraint::Kind::JsonSchema(text) | pb::constraint::Kind::Regex(text)) = &kind;
    if text.len() > max_bytes {
        v.push(FieldViolation::new(
            "constraint",
            format!(
                "{} bytes, over the limit of {max_bytes} bytes (--max-constraint-bytes)",
                text.len(),
            ),
        ));
        return None;
    }
    part(Constraint::try_from(kind), v)
}

/// The image embeddings as one tensor, checked against the model and the prompt's image
/// tokens.
fn image_embeds(
    embeddings: &[pb::ImageEmbedding],
    prompt_ids: &[u32],
    info: &ModelInfo,
    v: &mut Violations,
) -> Option<Tensor> {
    let Some(img) = info.image_token_id else {
        if !embeddings.is_empty() {
            v.push(FieldViolation::new(
                "image_embeddings",
                "this model takes no image embeddings (it has no image token)",
            ));
        }
        return None;
    };
    let image_tokens = prompt_ids.iter().filter(|&&id| id == img).count();
    let got = embeddings_tensor(embeddings, info, v);
    let rows = got.as_ref().map_or(0, |(_, rows)| *rows);
    let shapes_ok = !v.iter().any(|x| x.field.starts_with("image_embeddings["));
    if shapes_ok && rows != image_tokens {
        v.push(FieldViolation::new(
            "image_embeddings",
            format!("{rows} embedding rows for {image_tokens} image tokens in prompt_ids"),
        ));
    }
    got.map(|(t, _)| t)
}

fn embeddings_tensor(
    embeddings: &[pb::ImageEmbedding],
    info: &ModelInfo,
    violations: &mut Vec<FieldViolation>,
) -> Option<(Tensor, usize)> {
    let mut values: Vec<f32> = Vec::new();
    let mut rows_total = 0usize;
    for (i, e) in embeddings.iter().enumerate() {
        let field = |f: &str| format!("image_embeddings[{i}].{f}");
        let size = match e.dtype.as_str() {
            "f32" => 4,
            "bf16" => 2,
            _ => {
                violations.push(FieldViolation::new(field("dtype"), "must be f32 or bf16"));
                continue;
            }
        };
        let [rows, width] = e.shape[..] else {
            violations.push(FieldViolation::new(
                field("shape"),
                "must be [rows, hidden_size]",
            ));
            continue;
        };
        let (rows, width) = (rows as usize, width as usize);
        if width != info.hidden_size {
            violations.push(FieldViolation::new(
                field("shape"),
                format!(
                    "width {width} is not the model's hidden size {}",
                    info.hidden_size
                ),
            ));
            continue;
        }
        let want = rows.checked_mul(width).and_then(|n| n.checked_mul(size));
        if want != Some(e.data.len()) {
            violations.push(FieldViolation::new(
                field("data"),
                format!(
                    "holds {} bytes; shape {:?} of {} needs {}",
                    e.data.len(),
                    e.shape,
                    e.dtype,
                    want.map_or_else(|| "too many".to_owned(), |n| n.to_string())
                ),
            ));
            continue;
        }
        rows_total += rows;
        if size == 4 {
            values.extend(
                e.data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        } else {
            values.extend(
                e.data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            );
        }
    }
    if !violations.is_empty() || rows_total == 0 {
        return None;
    }
    if values.iter().any(|v| !v.is_finite()) {
        violations.push(FieldViolation::new(
            "image_embeddings",
            "hold NaN or infinite values",
        ));
        return None;
    }
    match Tensor::from_vec(values, (rows_total, info.hidden_size), &Device::Cpu) {
        Ok(t) => Some((t, rows_total)),
        Err(_) => {
            violations.push(FieldViolation::new(
                "image_embeddings",
                "cannot be laid out as a [rows, hidden_size] tensor",
            ));
            None
        }
    }
}
