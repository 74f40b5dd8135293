//! The four clinical tasks: each prompt encoded by one `EncodeChat` call to the tokenizer
//! service, the vision service for images, generation on a pool, typed results.
//!
//! Every downstream call carries the caller's trace context and remaining deadline, and the
//! gateway enforces the deadline itself. Streams are dropped (which cancels the generator's
//! sequence) as soon as the caller goes away or the deadline passes.

use std::future::Future;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};

use medgemma_proto::gateway::v1 as pb;
use medgemma_proto::generation::v1 as gen_pb;
use medgemma_proto::tokenizer::v1 as tok_pb;
use medgemma_proto::vision::v1 as vis_pb;
use medgemma_rpc::trace::TraceContext;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Code, Request};
use tracing::Instrument;

use crate::error::GatewayError;
use crate::pool::Pool;
use crate::prompt::{self, OPTION_LETTERS};
use crate::structured::{self, Report, Summary};
use crate::validate::{AskTask, DeidentifyTask, McqTask, ReportTask, Sampling, SummarizeTask};
use medgemma_rpc::deadline::Deadline;

/// Most conversations one `EncodeChat` carries (the request's own and its `more`; the
/// tokenizer service accepts 1 + 512).
const CHATS_PER_ENCODE: usize = 513;

/// De-identification windows generating at once for one request: enough for the generator to
/// batch them, few enough that one long note does not fill its queue.
const WINDOWS_IN_FLIGHT: usize = 4;

/// Where text deltas of a streaming task go.
pub type Deltas = mpsc::Sender<String>;

/// One incoming call's context, carried to every downstream call.
#[derive(Debug, Clone, Copy)]
pub struct CallCtx {
    pub deadline: Deadline,
    pub trace: TraceContext,
    /// The clinical task (a closed set), sent on as `medgemma-task` so backends count by task.
    pub task: &'static str,
}

impl CallCtx {
    /// A downstream request carrying the trace (this hop as parent) and the remaining deadline.
    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        medgemma_rpc::trace::inject(&self.trace, req.metadata_mut());
        req.metadata_mut().insert(
            medgemma_rpc::TASK_HEADER,
            tonic::metadata::MetadataValue::from_static(self.task),
        );
        self.deadline.apply(&mut req);
        req
    }

    /// Runs `fut` unless the deadline passes first.
    async fn bounded<T>(
        &self,
        stage: &'static str,
        fut: impl Future<Output = Result<T, GatewayError>>,
    ) -> Result<T, GatewayError> {
        if self.deadline.expired() {
            return Err(GatewayError::DeadlineExceeded { stage });
        }
        tokio::select! {
            r = fut => r,
            () = self.deadline.sleep() => Err(GatewayError::DeadlineExceeded { stage }),
        }
    }
}

/// Default of `--max-input-tokens`.
pub const DEFAULT_MAX_INPUT_TOKENS: u32 = 32_768;

/// The pools and settings the tasks run on.
#[derive(Debug)]
pub struct Tasks {
    pub tokenizer: Arc<Pool>,
    pub text: Arc<Pool>,
    pub multimodal: Arc<Pool>,
    pub vision: Arc<Pool>,
    pub disclaimer: String,
    /// The most prompt tokens one generator call may carry (`--max-input-tokens`).
    pub max_input_tokens: u32,
}

/// Token counts and timings summed over a task's model calls.
#[derive(Debug, Default)]
struct Acc {
    prompt_tokens: u32,
    completion_tokens: u32,
    queue_ms: f64,
    prefill_ms: f64,
    decode_ms: f64,
    vision_ms: f64,
    model_id: String,
}

impl Acc {
    fn add(&mut self, r: &gen_pb::GenerateResponse) {
        if let Some(u) = &r.usage {
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
        }
        if let Some(t) = &r.timings {
            self.queue_ms += t.queue_ms;
            self.prefill_ms += t.prefill_ms;
            self.decode_ms += t.decode_ms;
        }
        self.model_id.clone_from(&r.model_id);
    }

    fn usage(&self) -> pb::Usage {
        pb::Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    fn timings(&self, started: Instant) -> pb::Timings {
        pb::Timings {
            queue_ms: self.queue_ms,
            prefill_ms: self.prefill_ms,
            decode_ms: self.decode_ms,
            vision_ms: self.vision_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        }
    }
}

fn finish_reason(r: &gen_pb::GenerateResponse) -> pb::FinishReason {
    match gen_pb::FinishReason::try_from(r.finish_reason) {
        Ok(gen_pb::FinishReason::Stop) => pb::FinishReason::Stop,
        Ok(gen_pb::FinishReason::Length) => pb::FinishReason::Length,
        Ok(gen_pb::FinishReason::Cancelled) => pb::FinishReason::Cancelled,
        Ok(gen_pb::FinishReason::Unspecified) | Err(_) => pb::FinishReason::Unspecified,
    }
}

fn gen_sampling(s: &Sampling) -> gen_pb::SamplingParams {
    gen_pb::SamplingParams {
        temperature: Some(s.temperature),
        top_p: s.top_p,
        top_k: s.top_k,
        max_new_tokens: Some(s.max_new_tokens),
        seed: s.seed,
        ..Default::default()
    }
}

/// A generation of `prompt_ids` with the task's sampling, under the JSON `schema` when given.
fn gen_request(
    prompt_ids: Vec<u32>,
    sampling: &Sampling,
    schema: Option<String>,
) -> gen_pb::GenerateRequest {
    gen_pb::GenerateRequest {
        prompt_ids,
        sampling: Some(gen_sampling(sampling)),
        constraint: schema.map(|s| gen_pb::Constraint {
            kind: Some(gen_pb::constraint::Kind::JsonSchema(s)),
        }),
        ..Default::default()
    }
}

fn text_part(text: impl Into<String>) -> tok_pb::ContentPart {
    tok_pb::ContentPart {
        kind: Some(tok_pb::content_part::Kind::Text(text.into())),
    }
}

fn image_part() -> tok_pb::ContentPart {
    tok_pb::ContentPart {
        kind: Some(tok_pb::content_part::Kind::Image(
            tok_pb::ImagePlaceholder {},
        )),
    }
}

fn message(role: &str, parts: Vec<tok_pb::ContentPart>) -> tok_pb::ChatMessage {
    tok_pb::ChatMessage {
        role: role.to_owned(),
        parts,
    }
}

/// A system turn (when there is one) and a user turn.
fn chat(system: Option<&str>, user: Vec<tok_pb::ContentPart>) -> Vec<tok_pb::ChatMessage> {
    let mut m = Vec::with_capacity(2);
    if let Some(s) = system {
        m.push(message("system", vec![text_part(s)]));
    }
    m.push(message("user", user));
    m
}

/// Softmax of log-probabilities, in f64; all `-inf` (or NaN) gives the uniform distribution.
pub fn softmax(logprobs: &[f32]) -> Vec<f64> {
    let max = logprobs
        .iter()
        .map(|&l| f64::from(l))
        .filter(|l| l.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        let n = logprobs.len().max(1) as f64;
        return vec![1.0 / n; logprobs.len()];
    }
    let exps: Vec<f64> = logprobs
        .iter()
        .map(|&l| {
            let l = f64::from(l);
            if l.is_finite() { (l - max).exp() } else { 0.0 }
        })
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Index of the largest value (the first of ties).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl Tasks {
    /// Tasks over these pools.
    pub fn new(
        tokenizer: Arc<Pool>,
        text: Arc<Pool>,
        multimodal: Arc<Pool>,
        vision: Arc<Pool>,
        disclaimer: String,
    ) -> Self {
        Self {
            tokenizer,
            text,
            multimodal,
            vision,
            disclaimer,
            max_input_tokens: DEFAULT_MAX_INPUT_TOKENS,
        }
    }

    /// Sets the prompt token cap per generator call.
    pub fn with_max_input_tokens(mut self, max: u32) -> Self {
        self.max_input_tokens = max;
        self
    }

    /// The prompt of `messages` (with the opening of the model's turn) as token ids, in one
    /// tokenizer call: `EncodeChat`. `continuations` come back encoded on their own as
    /// ordinary text, to be appended.
    async fn encode_chat(
        &self,
        ctx: &CallCtx,
        messages: Vec<tok_pb::ChatMessage>,
        tokens_per_image: Option<u32>,
        continuations: Vec<String>,
    ) -> Result<tok_pb::EncodeChatResponse, GatewayError> {
        self.call_encode_chat(
            ctx,
            tok_pb::EncodeChatRequest {
                messages,
                add_generation_prompt: true,
                tokens_per_image,
                continuations,
                more: Vec::new(),
            },
        )
        .await
    }

    /// The text-only prompts of `chats`, in order: one tokenizer call (`EncodeChat` with
    /// `more`) for up to [`CHATS_PER_ENCODE`] of them.
    async fn encode_chats(
        &self,
        ctx: &CallCtx,
        chats: Vec<Vec<tok_pb::ChatMessage>>,
    ) -> Result<Vec<Vec<u32>>, GatewayError> {
        let mut prompts = Vec::with_capacity(chats.len());
        for chunk in chats.chunks(CHATS_PER_ENCODE) {
            let Some((first, more)) = chunk.split_first() else {
                continue;
            };
            let r = self
                .call_encode_chat(
                    ctx,
                    tok_pb::EncodeChatRequest {
                        messages: first.clone(),
                        add_generation_prompt: true,
                        more: more
                            .iter()
                            .map(|messages| tok_pb::Conversation {
                                messages: messages.clone(),
                            })
                            .collect(),
                        ..Default::default()
                    },
                )
                .await?;
            if r.more.len() != more.len() {
                return Err(GatewayError::BadUpstreamResponse {
                    pool: self.tokenizer.name(),
                    reason: format!(
                        "asked for {} further prompts, got {}",
                        more.len(),
                        r.more.len()
                    ),
                });
            }
            prompts.push(r.ids);
            prompts.extend(r.more.into_iter().map(|p| p.ids));
        }
        Ok(prompts)
    }

    /// One `EncodeChat` on the tokenizer pool, bounded by the call's deadline, in an `encode`
    /// span.
    async fn call_encode_chat(
        &self,
        ctx: &CallCtx,
        req: tok_pb::EncodeChatRequest,
    ) -> Result<tok_pb::EncodeChatResponse, GatewayError> {
        let conversations =
            || std::iter::once(&req.messages).chain(req.more.iter().map(|c| &c.messages));
        let parts = || conversations().flatten().flat_map(|m| &m.parts);
        let image_count = parts()
            .filter(|p| matches!(p.kind, Some(tok_pb::content_part::Kind::Image(_))))
            .count();
        if medgemma_rpc::telemetry::log_content() {
            let texts: Vec<&str> = parts()
                .filter_map(|p| match &p.kind {
                    Some(tok_pb::content_part::Kind::Text(t)) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            // Patient data: only with --log-content, which warned at start-up.
            tracing::debug!(prompt = ?texts, "encoding (--log-content)");
        }
        let fut = self.tokenizer.call(|ch| {
            let req = ctx.request(req.clone());
            async move {
                let mut c =
                    medgemma_rpc::with_limits!(tok_pb::tokenizer_client::TokenizerClient::new(ch));
                c.encode_chat(req).await.map(|r| r.into_inner())
            }
        });
        ctx.bounded("encoding the prompt", fut)
            .instrument(tracing::info_span!(
                "encode",
                otel.kind = "client",
                medgemma.image_count = image_count,
                medgemma.prompt_count = 1 + req.more.len()
            ))
            .await
    }

    /// A text-only prompt encoded (one tokenizer call) and generated on the text pool with the
    /// task's sampling, under `schema` when given; `content_field` as in
    /// [`generate`](Self::generate).
    async fn generate_text(
        &self,
        ctx: &CallCtx,
        messages: Vec<tok_pb::ChatMessage>,
        sampling: &Sampling,
        schema: Option<String>,
        deltas: Option<&Deltas>,
        content_field: &'static str,
    ) -> Result<gen_pb::GenerateResponse, GatewayError> {
        let ids = self.encode_chat(ctx, messages, None, Vec::new()).await?.ids;
        let req = gen_request(ids, sampling, schema);
        self.generate(&self.text, ctx, req, deltas, content_field)
            .await
    }

    /// The option letters' token ids: the first id of each letter encoded alone (Gemma's
    /// vocabulary has every capital letter as one token); distinct, or the tokenizer is wrong.
    fn letter_ids(&self, encoded: &[tok_pb::TokenIds]) -> Result<Vec<u32>, GatewayError> {
        let mut ids = Vec::with_capacity(encoded.len());
        for (enc, letter) in encoded.iter().zip(OPTION_LETTERS) {
            let first = *enc
                .ids
                .first()
                .ok_or_else(|| GatewayError::BadUpstreamResponse {
                    pool: self.tokenizer.name(),
                    reason: format!("option letter {letter} encodes to no token"),
                })?;
            if enc.ids.len() > 1 {
                tracing::warn!(
                    letter,
                    tokens = enc.ids.len(),
                    "option letter is several tokens; using the first"
                );
            }
            if ids.contains(&first) {
                return Err(GatewayError::BadUpstreamResponse {
                    pool: self.tokenizer.name(),
                    reason: "two option letters share a token id".into(),
                });
            }
            ids.push(first);
        }
        Ok(ids)
    }

    /// Generates on `pool`, streaming text deltas to `deltas` when given. `content_field` names
    /// the request field a rejected prompt is blamed on (prompt over the context).
    async fn generate(
        &self,
        pool: &Pool,
        ctx: &CallCtx,
        req: gen_pb::GenerateRequest,
        deltas: Option<&Deltas>,
        content_field: &'static str,
    ) -> Result<gen_pb::GenerateResponse, GatewayError> {
        if req.prompt_ids.len() > self.max_input_tokens as usize {
            return Err(GatewayError::field(
                content_field,
                format!(
                    "the prompt is {} tokens, over the limit of {} (--max-input-tokens)",
                    req.prompt_ids.len(),
                    self.max_input_tokens
                ),
            ));
        }
        let span = crate::telemetry::chat_span(pool.name(), &req);
        let r = self
            .generate_inner(pool, ctx, req, deltas, content_field)
            .instrument(span.clone())
            .await;
        crate::telemetry::chat_done(&span, &r);
        if medgemma_rpc::telemetry::log_content()
            && let Ok(r) = &r
        {
            // Patient data: only with --log-content, which warned at start-up.
            tracing::debug!(parent: &span, answer = %r.text, "generated (--log-content)");
        }
        r
    }

    async fn generate_inner(
        &self,
        pool: &Pool,
        ctx: &CallCtx,
        req: gen_pb::GenerateRequest,
        deltas: Option<&Deltas>,
        content_field: &'static str,
    ) -> Result<gen_pb::GenerateResponse, GatewayError> {
        let caller_gone = async {
            match deltas {
                Some(tx) => tx.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(caller_gone);
        // Open the stream and wait for its first message: until then another replica may be
        // tried (nothing has reached the caller).
        let open = pool.call(|ch| {
            let req = ctx.request(req.clone());
            async move {
                let mut c =
                    medgemma_rpc::with_limits!(gen_pb::generator_client::GeneratorClient::new(ch));
                let mut stream = c.generate_stream(req).await?.into_inner();
                let first = stream.message().await?;
                Ok((first, stream))
            }
        });
        let (mut next, mut stream) = tokio::select! {
            r = ctx.bounded("generating", open) => r.map_err(|e| blame_prompt(e, content_field))?,
            () = &mut caller_gone => return Err(GatewayError::Cancelled),
        };
        loop {
            let event = match next {
                Some(m) => m.event,
                None => {
                    return Err(GatewayError::BadUpstreamResponse {
                        pool: pool.name(),
                        reason: "the generation stream ended without a final response".into(),
                    });
                }
            };
            match event {
                Some(gen_pb::generate_stream_response::Event::Delta(d)) => {
                    if let Some(tx) = deltas
                        && !d.text.is_empty()
                        && tx.send(d.text).await.is_err()
                    {
                        // The caller went away: dropping the stream cancels the sequence.
                        return Err(GatewayError::Cancelled);
                    }
                }
                Some(gen_pb::generate_stream_response::Event::Response(r)) => {
                    finish_in_background(stream);
                    return Ok(r);
                }
                None => {}
            }
            next = tokio::select! {
                m = stream.message() => m.map_err(|status| blame_prompt(GatewayError::Upstream { pool: pool.name(), status }, content_field))?,
                () = ctx.deadline.sleep() => return Err(GatewayError::DeadlineExceeded { stage: "generating" }),
                () = &mut caller_gone => return Err(GatewayError::Cancelled),
            };
        }
    }

    /// `Ask`.
    pub async fn ask(
        &self,
        ctx: &CallCtx,
        task: AskTask,
        deltas: Option<&Deltas>,
    ) -> Result<pb::AskResponse, GatewayError> {
        let started = Instant::now();
        let messages = chat(task.system.as_deref(), vec![text_part(task.question)]);
        let r = self
            .generate_text(ctx, messages, &task.sampling, None, deltas, "question")
            .await?;
        let mut acc = Acc::default();
        acc.add(&r);
        Ok(pb::AskResponse {
            answer: r.text.trim().to_owned(),
            model_id: acc.model_id.clone(),
            usage: Some(acc.usage()),
            finish_reason: finish_reason(&r).into(),
            timings: Some(acc.timings(started)),
            disclaimer: self.disclaimer.clone(),
        })
    }

    /// `SummarizeClinicalNote`.
    pub async fn summarize(
        &self,
        ctx: &CallCtx,
        task: SummarizeTask,
        deltas: Option<&Deltas>,
    ) -> Result<pb::SummarizeClinicalNoteResponse, GatewayError> {
        let started = Instant::now();
        let messages = chat(
            Some(prompt::MEDICAL_SYSTEM_PROMPT),
            vec![text_part(prompt::summarize(
                &task.note,
                &task.output_language,
            ))],
        );
        let schema = structured::summary_schema().to_string();
        let r = self
            .generate_text(ctx, messages, &task.sampling, Some(schema), deltas, "note")
            .await?;
        let mut acc = Acc::default();
        acc.add(&r);
        let s: Summary = structured::parse_lenient(&r.text);
        let h = prompt::summary_headings(&task.output_language);
        let mut text = format!(
            "{}: {}\n{}:\n",
            h.chief_complaint, s.chief_complaint, h.diagnoses
        );
        for d in &s.diagnoses {
            text.push_str(&format!("- {d}\n"));
        }
        text.push_str(&format!(
            "{}: {}\n{}: {}",
            h.treatment_plan, s.treatment_plan, h.follow_up, s.follow_up
        ));
        Ok(pb::SummarizeClinicalNoteResponse {
            chief_complaint: s.chief_complaint,
            diagnoses: s.diagnoses,
            treatment_plan: s.treatment_plan,
            follow_up: s.follow_up,
            text,
            output_language: task.output_language,
            model_id: acc.model_id.clone(),
            usage: Some(acc.usage()),
            finish_reason: finish_reason(&r).into(),
            timings: Some(acc.timings(started)),
            disclaimer: self.disclaimer.clone(),
        })
    }

    /// `AnswerMultipleChoice`: the option letters' logprobs at the answer position (one prefill,
    /// greedy, one token), then the explanation with the chosen answer written into the model's
    /// turn.
    pub async fn multiple_choice(
        &self,
        ctx: &CallCtx,
        task: McqTask,
        deltas: Option<&Deltas>,
    ) -> Result<pb::AnswerMultipleChoiceResponse, GatewayError> {
        let started = Instant::now();
        let n = task.options.len();
        let messages = chat(
            Some(prompt::MEDICAL_SYSTEM_PROMPT),
            vec![text_part(prompt::multiple_choice(
                &task.question,
                &task.options,
            ))],
        );
        // One tokenizer call: the prompt, the option letters, and for each option what the
        // model's turn starts with once it is chosen.
        let mut continuations: Vec<String> =
            OPTION_LETTERS[..n].iter().map(|&l| l.to_owned()).collect();
        continuations.extend(
            task.options
                .iter()
                .zip(OPTION_LETTERS)
                .map(|(o, l)| prompt::multiple_choice_answer_prefix(l, o)),
        );
        let encoded = self.encode_chat(ctx, messages, None, continuations).await?;
        if encoded.continuations.len() != 2 * n {
            return Err(GatewayError::BadUpstreamResponse {
                pool: self.tokenizer.name(),
                reason: format!(
                    "asked for {} continuations, got {}",
                    2 * n,
                    encoded.continuations.len()
                ),
            });
        }
        let (letter_ids, answers) = encoded.continuations.split_at(n);
        let letters = self.letter_ids(letter_ids)?;
        let ids = encoded.ids;
        let scored = self
            .generate(
                &self.text,
                ctx,
                gen_pb::GenerateRequest {
                    prompt_ids: ids.clone(),
                    sampling: Some(gen_pb::SamplingParams {
                        temperature: Some(0.0),
                        max_new_tokens: Some(1),
                        ..Default::default()
                    }),
                    logprob_token_ids: letters.clone(),
                    ..Default::default()
                },
                None,
                "question",
            )
            .await?;
        let mut lps = vec![f32::NEG_INFINITY; n];
        if scored.first_token_logprobs.len() != n {
            return Err(GatewayError::BadUpstreamResponse {
                pool: self.text.name(),
                reason: format!(
                    "asked for {n} first-token logprobs, got {}",
                    scored.first_token_logprobs.len()
                ),
            });
        }
        for (slot, (tl, want)) in lps
            .iter_mut()
            .zip(scored.first_token_logprobs.iter().zip(&letters))
        {
            if tl.token_id != *want {
                return Err(GatewayError::BadUpstreamResponse {
                    pool: self.text.name(),
                    reason: "first-token logprobs came back for other token ids".into(),
                });
            }
            *slot = tl.logprob;
        }
        let probabilities = softmax(&lps);
        let chosen = argmax(&probabilities);
        let letter = OPTION_LETTERS[chosen];
        // The first call's ids, then the chosen answer's: the generator's prefix cache serves
        // the shared prompt.
        let mut ids = ids;
        ids.extend_from_slice(&answers[chosen].ids);
        let r = self
            .generate(
                &self.text,
                ctx,
                gen_request(ids, &task.sampling, None),
                deltas,
                "question",
            )
            .await?;
        let mut acc = Acc::default();
        acc.add(&scored);
        acc.add(&r);
        Ok(pb::AnswerMultipleChoiceResponse {
            chosen_index: chosen as u32,
            chosen_letter: letter.to_owned(),
            explanation: r.text.trim().to_owned(),
            option_probabilities: probabilities,
            model_id: acc.model_id.clone(),
            usage: Some(acc.usage()),
            finish_reason: finish_reason(&r).into(),
            timings: Some(acc.timings(started)),
            disclaimer: self.disclaimer.clone(),
        })
    }

    /// The vision pool's embedding of one image, and how long it took (ms).
    async fn embed_image(
        &self,
        ctx: &CallCtx,
        image: vis_pb::Image,
    ) -> Result<(vis_pb::Embedding, f64), GatewayError> {
        let t_vision = Instant::now();
        let embed = self.vision.call(|ch| {
            let req = ctx.request(vis_pb::EmbedRequest {
                images: vec![image.clone()],
            });
            async move {
                let mut c = medgemma_rpc::with_limits!(
                    vis_pb::vision_encoder_client::VisionEncoderClient::new(ch)
                );
                c.embed(req).await.map(|r| r.into_inner())
            }
        });
        let embedded = ctx
            .bounded("encoding the image", embed)
            .instrument(tracing::info_span!(
                "vision.embed",
                otel.kind = "client",
                medgemma.image_count = 1
            ))
            .await
            .map_err(blame_image)?;
        let vision_ms = t_vision.elapsed().as_secs_f64() * 1e3;
        let [emb]: [vis_pb::Embedding; 1] =
            embedded.embeddings.try_into().map_err(|v: Vec<_>| {
                GatewayError::BadUpstreamResponse {
                    pool: self.vision.name(),
                    reason: format!("asked for 1 embedding, got {}", v.len()),
                }
            })?;
        Ok((emb, vision_ms))
    }

    /// `DraftRadiologyReport`: the vision pool encodes the image while the tokenizer encodes
    /// the prompt, then the multimodal pool writes the report with the embeddings in place of
    /// the image tokens.
    pub async fn report(
        &self,
        ctx: &CallCtx,
        task: ReportTask,
        deltas: Option<&Deltas>,
    ) -> Result<pb::DraftRadiologyReportResponse, GatewayError> {
        let started = Instant::now();
        let image = vis_pb::Image {
            data: task.image,
            mime_type: task.mime_type,
            dicom_frame: None,
        };
        let messages = chat(
            None,
            vec![
                image_part(),
                text_part(prompt::radiology_report(&task.modality, &task.body_part)),
            ],
        );
        // The prompt is encoded at the tokenizer's soft-token count while the image is encoded;
        // only if the vision service's embedding has another row count is it encoded again.
        let ((emb, vision_ms), encoded) = tokio::try_join!(
            self.embed_image(ctx, image),
            self.encode_chat(ctx, messages.clone(), None, Vec::new()),
        )?;
        let rows = match emb.shape.as_slice() {
            [rows, _hidden] if *rows > 0 => *rows,
            other => {
                return Err(GatewayError::BadUpstreamResponse {
                    pool: self.vision.name(),
                    reason: format!("embedding shape {other:?} is not [rows, hidden]"),
                });
            }
        };
        let ids = match encoded.image_spans.as_slice() {
            [span] if span.length == rows => encoded.ids,
            _ => {
                self.encode_chat(ctx, messages, Some(rows), Vec::new())
                    .await?
                    .ids
            }
        };
        let r = self
            .generate(
                &self.multimodal,
                ctx,
                gen_pb::GenerateRequest {
                    image_embeddings: vec![gen_pb::ImageEmbedding {
                        data: emb.data,
                        dtype: emb.dtype,
                        shape: emb.shape,
                        sha256: emb.sha256,
                    }],
                    ..gen_request(
                        ids,
                        &task.sampling,
                        Some(structured::report_schema().to_string()),
                    )
                },
                deltas,
                "image",
            )
            .await?;
        let mut acc = Acc {
            vision_ms,
            ..Acc::default()
        };
        acc.add(&r);
        let rep: Report = structured::parse_lenient(&r.text);
        Ok(pb::DraftRadiologyReportResponse {
            technique: rep.technique,
            findings: rep.findings,
            impression: rep.impression,
            requires_physician_review: true,
            model_id: acc.model_id.clone(),
            usage: Some(acc.usage()),
            finish_reason: finish_reason(&r).into(),
            timings: Some(acc.timings(started)),
            disclaimer: self.disclaimer.clone(),
        })
    }
}

impl Tasks {
    /// `Deidentify`: the recognizers over the whole text (on a blocking thread), then, unless
    /// turned off, the model pass window by window on the text pool under the JSON schema of
    /// [`medgemma_deid::model::schema`]; the union resolved and replaced. Nothing of the text,
    /// the spans or the fakes is logged.
    pub async fn deidentify(
        &self,
        ctx: &CallCtx,
        task: DeidentifyTask,
    ) -> Result<pb::DeidentifyResponse, GatewayError> {
        use medgemma_deid::model;
        let started = Instant::now();
        let text: Arc<str> = Arc::from(task.text);
        let language = task
            .language
            .unwrap_or_else(|| medgemma_deid::Language::detect(&text));
        let t = text.clone();
        let mut findings = tokio::task::spawn_blocking(move || medgemma_deid::rule_findings(&t))
            .await
            .map_err(|_| GatewayError::Cancelled)?;
        let mut acc = Acc::default();
        let mut truncated = 0u32;
        if task.use_model {
            let windows = model::windows(&text, model::WINDOW_CHARS, model::OVERLAP_CHARS);
            let chats = windows
                .iter()
                .map(|w| {
                    let prompt = model::prompt(&text[w.start..w.end], language);
                    chat(None, vec![text_part(prompt)])
                })
                .collect();
            let prompts = self.encode_chats(ctx, chats).await?;
            let schema = model::schema().to_string();
            // The windows go out together (a few at a time) so the generator batches them;
            // answers come back in window order.
            let answers: Vec<gen_pb::GenerateResponse> = futures_util::stream::iter(prompts)
                .map(|ids| {
                    let req = gen_request(ids, &task.sampling, Some(schema.clone()));
                    self.generate(&self.text, ctx, req, None, "text")
                })
                .buffered(WINDOWS_IN_FLIGHT)
                .try_collect()
                .await?;
            for (w, r) in windows.into_iter().zip(&answers) {
                acc.add(r);
                if finish_reason(r) == pb::FinishReason::Length {
                    truncated += 1;
                }
                findings.extend(model::findings(&text, w, &model::parse_answer(&r.text)));
            }
        }
        let mode = task.mode;
        let (out, spans) = tokio::task::spawn_blocking(move || {
            let spans = medgemma_deid::resolve(&text, findings);
            (medgemma_deid::render(&text, &spans, mode), spans)
        })
        .await
        .map_err(|_| GatewayError::Cancelled)?;
        Ok(pb::DeidentifyResponse {
            text: out,
            spans: spans
                .into_iter()
                .map(|s| pb::PhiSpan {
                    start: s.start as u32,
                    end: s.end as u32,
                    byte_start: s.byte_start as u32,
                    byte_end: s.byte_end as u32,
                    r#type: s.phi_type.as_str().to_owned(),
                    source: match s.source {
                        medgemma_deid::Source::Rule => pb::SpanSource::Rule,
                        medgemma_deid::Source::Model => pb::SpanSource::Model,
                        medgemma_deid::Source::Both => pb::SpanSource::Both,
                    }
                    .into(),
                    confidence: s.confidence,
                })
                .collect(),
            language: language.as_str().to_owned(),
            usage: Some(acc.usage()),
            model_id: acc.model_id.clone(),
            timings: Some(acc.timings(started)),
            disclaimer: self.disclaimer.clone(),
            truncated_windows: truncated,
        })
    }
}

/// A generator's INVALID_ARGUMENT (prompt over the context, ...) is about the prompt the gateway
/// built from `field`: blame that field.
fn blame_prompt(e: GatewayError, field: &'static str) -> GatewayError {
    match e {
        GatewayError::Upstream { status, .. } if status.code() == Code::InvalidArgument => {
            GatewayError::field(
                field,
                format!(
                    "the model rejected the prompt made from it: {}",
                    status.message()
                ),
            )
        }
        other => other,
    }
}

/// The vision service's INVALID_ARGUMENT (not decodable, too large) is about `image.data`.
fn blame_image(e: GatewayError) -> GatewayError {
    match e {
        GatewayError::Upstream { status, .. } if status.code() == Code::InvalidArgument => {
            let why = medgemma_rpc::field_violations(&status)
                .into_iter()
                .next()
                .map(|v| v.description)
                .unwrap_or_else(|| status.message().to_owned());
            GatewayError::field("image.data", why)
        }
        other => other,
    }
}

/// Reads a generation stream past its final response to its end, off the caller's path: the
/// answer is already on its way, but dropping the stream before the trailers arrive resets
/// it, and the generator would count a finished call as CANCELLED. Bounded, so a replica that
/// never closes the stream costs a task, not a leak.
fn finish_in_background(mut stream: tonic::Streaming<gen_pb::GenerateStreamResponse>) {
    tokio::spawn(async move {
        let drain = async { while let Ok(Some(_)) = stream.message().await {} };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[-1.0, -2.0, -0.5, f32::NEG_INFINITY]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&p), 2);
        assert_eq!(p[3], 0.0);
        let u = softmax(&[f32::NEG_INFINITY, f32::NAN]);
        assert_eq!(u, vec![0.5, 0.5]);
        // Very negative logprobs do not underflow to 0/0.
        let p = softmax(&[-1000.0, -1001.0]);
        assert!((p[0] + p[1] - 1.0).abs() < 1e-12 && p[0] > p[1]);
        assert_eq!(argmax(&[0.5, 0.5]), 0);
    }
}
