//! The `medgemma.tokenizer.v1.Tokenizer` service. CPU work (rendering, encoding, decoding)
//! runs on the blocking pool, never on the async runtime's threads.

use std::sync::Arc;

use medgemma_proto::tokenizer::v1 as pb;
use medgemma_proto::tokenizer::v1::tokenizer_server::{Tokenizer as TokenizerRpc, TokenizerServer};
use medgemma_rpc::{FieldViolation, bad_request, bad_request_violations};
use medgemma_tokenizer::{
    ChatMessage, ContentPart, ImageTokens, PromptEncoder, Tokenizer, TokenizerError,
};
use tonic::{Request, Response, Status};

use crate::config::service_limits::MAX_TOKENS_PER_IMAGE;

/// Default of `--max-image-tokens`: 64 images of Gemma 3's 256 soft tokens.
pub const DEFAULT_MAX_IMAGE_TOKENS: u64 = 16_384;

/// Most messages in one `RenderChat` or `EncodeChat`.
const MAX_MESSAGES: usize = 1024;

/// Most continuations in one `EncodeChat`.
const MAX_CONTINUATIONS: usize = 64;

/// Most further conversations (`more`) in one `EncodeChat`.
const MAX_MORE_CONVERSATIONS: usize = 512;

struct Inner {
    encoder: PromptEncoder,
    tokens_per_image: usize,
    /// The most image soft tokens (`image_count x tokens_per_image`) one request may expand.
    max_image_tokens: u64,
}

/// The tokenizer service over a loaded tokenizer and chat template. Clone freely.
#[derive(Clone)]
pub struct TokenizerService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenizerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &self.inner.encoder;
        f.debug_struct("TokenizerService")
            .field("vocab_size", &e.tokenizer().vocab_size())
            .field("template", &e.template().origin())
            .field("image_tokens", &e.image_tokens().is_some())
            .finish()
    }
}

/// A tokenizer failure while serving a request: bad input for what the caller controls,
/// INTERNAL otherwise. Never carries the text.
fn tokenizer_status(e: TokenizerError) -> Status {
    tokenizer_status_in(e, "")
}

/// [`tokenizer_status`] for the conversation whose fields start with `prefix` (`"more[2]."`).
fn tokenizer_status_in(e: TokenizerError, prefix: &str) -> Status {
    match e {
        TokenizerError::ConversationRejected(reason) | TokenizerError::InvalidText(reason) => {
            bad_request(format!("{prefix}messages"), reason)
        }
        TokenizerError::ImagePlaceholders(reason) => bad_request("image_count", reason),
        TokenizerError::InvalidTokenId { id: _, vocab_size } => bad_request(
            "ids",
            format!("holds an id outside the vocabulary (size {vocab_size})"),
        ),
        TokenizerError::UnknownToken { .. }
        | TokenizerError::Io { .. }
        | TokenizerError::NotFound(_)
        | TokenizerError::InvalidFile { .. }
        | TokenizerError::Gguf(_)
        | TokenizerError::Tokenizers { .. }
        | TokenizerError::Template { .. } => Status::internal(e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Status::internal("the tokenizer task failed"))?
}

impl TokenizerService {
    /// Serves the prompt pipeline `encoder`; `tokens_per_image` is the default soft-token
    /// count.
    pub fn new(encoder: PromptEncoder, tokens_per_image: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                encoder,
                tokens_per_image,
                max_image_tokens: DEFAULT_MAX_IMAGE_TOKENS,
            }),
        }
    }

    fn tokenizer(&self) -> &Tokenizer {
        self.inner.encoder.tokenizer()
    }

    /// Sets the most image soft tokens (`image_count x tokens_per_image`) one request may
    /// expand (`--max-image-tokens`); more is INVALID_ARGUMENT before anything is allocated.
    pub fn with_max_image_tokens(mut self, max: u64) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_image_tokens = max;
        }
        self
    }

    /// The tonic server for this service, with raised message limits.
    pub fn into_server(self) -> TokenizerServer<Self> {
        medgemma_rpc::with_limits!(TokenizerServer::new(self))
    }

    /// The image tokens at `tokens_per_image` (or the default), or why not.
    fn image_layout(&self, tokens_per_image: Option<u32>) -> Result<ImageTokens, Status> {
        let image = self.inner.encoder.image_tokens().ok_or_else(|| {
            Status::failed_precondition(
                "this tokenizer has no image tokens (a text-only vocabulary)",
            )
        })?;
        Ok(ImageTokens {
            tokens_per_image: self.tokens_per_image(tokens_per_image)?,
            ..image.clone()
        })
    }

    /// A request's soft tokens per image, or the default; INVALID_ARGUMENT out of range.
    fn tokens_per_image(&self, requested: Option<u32>) -> Result<usize, Status> {
        match requested {
            None => Ok(self.inner.tokens_per_image),
            Some(n) if n == 0 || n > MAX_TOKENS_PER_IMAGE => Err(bad_request(
                "tokens_per_image",
                format!("must be in 1..={MAX_TOKENS_PER_IMAGE}"),
            )),
            Some(n) => Ok(n as usize),
        }
    }

    /// INVALID_ARGUMENT when `image_count x tokens_per_image` is over `--max-image-tokens`,
    /// before anything is allocated for the images.
    fn check_image_tokens(&self, image_count: u32, tokens_per_image: usize) -> Result<(), Status> {
        let wanted = u64::from(image_count) * tokens_per_image as u64;
        let max = self.inner.max_image_tokens;
        if wanted > max {
            return Err(bad_request(
                "image_count",
                format!(
                    "{image_count} images x {tokens_per_image} tokens per image = {wanted} image \
                     tokens, over the limit of {max} (--max-image-tokens)"
                ),
            ));
        }
        Ok(())
    }

    /// Expands, encodes and checks; the ids and the image spans.
    fn encode_blocking(
        &self,
        text: String,
        add_special_tokens: bool,
        image_count: u32,
        tokens_per_image: Option<u32>,
    ) -> Result<(Vec<u32>, Vec<pb::ImageSpan>), Status> {
        if image_count == 0 {
            let ids = self
                .tokenizer()
                .encode(&text, add_special_tokens)
                .map_err(tokenizer_status)?;
            return Ok((ids, Vec::new()));
        }
        let layout = self.image_layout(tokens_per_image)?;
        self.check_image_tokens(image_count, layout.tokens_per_image)?;
        let expanded = layout
            .expand(&text, image_count as usize)
            .map_err(tokenizer_status)?;
        let ids = self
            .tokenizer()
            .encode(&expanded, add_special_tokens)
            .map_err(tokenizer_status)?;
        layout
            .check_ids(&ids, image_count as usize)
            .map_err(tokenizer_status)?;
        let spans = layout.spans(&ids).into_iter().map(span).collect();
        Ok((ids, spans))
    }

    /// The prompt pipeline: render, expand, encode (each conversation); the continuations as
    /// ordinary text.
    fn encode_chat_blocking(
        &self,
        conversations: &[Vec<ChatMessage>],
        add_generation_prompt: bool,
        tokens_per_image: usize,
        continuations: &[String],
    ) -> Result<pb::EncodeChatResponse, Status> {
        let encoder = &self.inner.encoder;
        let mut prompts = conversations.iter().enumerate().map(|(i, messages)| {
            encoder
                .encode_chat(messages, add_generation_prompt, Some(tokens_per_image))
                .map_err(|e| match i {
                    0 => tokenizer_status(e),
                    i => tokenizer_status_in(e, &format!("more[{}].", i - 1)),
                })
        });
        let encoded = prompts
            .next()
            .ok_or_else(|| bad_request("messages", "must not be empty"))??;
        let more = prompts
            .map(|p| {
                p.map(|e| pb::EncodedPrompt {
                    ids: e.ids,
                    image_spans: e.image_spans.into_iter().map(span).collect(),
                })
            })
            .collect::<Result<_, _>>()?;
        let continuations = continuations
            .iter()
            .map(|text| {
                encoder
                    .tokenizer()
                    .encode_text(text)
                    .map(|ids| pb::TokenIds { ids })
            })
            .collect::<Result<_, _>>()
            .map_err(tokenizer_status)?;
        Ok(pb::EncodeChatResponse {
            ids: encoded.ids,
            image_spans: encoded.image_spans.into_iter().map(span).collect(),
            continuations,
            more,
        })
    }
}

fn span(r: std::ops::Range<usize>) -> pb::ImageSpan {
    pb::ImageSpan {
        start: r.start as u32,
        length: r.len() as u32,
    }
}

/// The messages of a request, or every violation; `prefix` names where they sit (`""` for the
/// request's own `messages`, `"more[2]."` for a further conversation).
fn convert_messages(
    messages: Vec<pb::ChatMessage>,
    prefix: &str,
) -> Result<(Vec<ChatMessage>, u32), Status> {
    let mut violations = Vec::new();
    if messages.is_empty() {
        violations.push(FieldViolation::new(
            format!("{prefix}messages"),
            "must not be empty",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        violations.push(FieldViolation::new(
            format!("{prefix}messages"),
            format!("at most {MAX_MESSAGES} messages"),
        ));
    }
    let mut images = 0u32;
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            violations.push(FieldViolation::new(
                format!("{prefix}messages[{i}].role"),
                "must be system, user or assistant",
            ));
        }
        let mut parts = Vec::with_capacity(m.parts.len());
        for (j, p) in m.parts.into_iter().enumerate() {
            match p.kind {
                Some(pb::content_part::Kind::Text(t)) => parts.push(ContentPart::Text(t)),
                Some(pb::content_part::Kind::Image(_)) => {
                    images += 1;
                    parts.push(ContentPart::Image);
                }
                None => violations.push(FieldViolation::new(
                    format!("{prefix}messages[{i}].parts[{j}]"),
                    "must hold text or an image",
                )),
            }
        }
        out.push(ChatMessage::new(m.role, parts));
    }
    if violations.is_empty() {
        Ok((out, images))
    } else {
        Err(bad_request_violations(violations))
    }
}

#[tonic::async_trait]
impl TokenizerRpc for TokenizerService {
    async fn render_chat(
        &self,
        request: Request<pb::RenderChatRequest>,
    ) -> Result<Response<pb::RenderChatResponse>, Status> {
        let req = request.into_inner();
        let (messages, image_count) = convert_messages(req.messages, "")?;
        let this = self.clone();
        let text = blocking(move || {
            this.inner
                .encoder
                .template()
                .render(&messages, req.add_generation_prompt)
                .map_err(tokenizer_status)
        })
        .await?;
        Ok(Response::new(pb::RenderChatResponse { text, image_count }))
    }

    async fn encode_chat(
        &self,
        request: Request<pb::EncodeChatRequest>,
    ) -> Result<Response<pb::EncodeChatResponse>, Status> {
        let req = request.into_inner();
        let (messages, mut image_count) = convert_messages(req.messages, "")?;
        if req.continuations.len() > MAX_CONTINUATIONS {
            return Err(bad_request(
                "continuations",
                format!("at most {MAX_CONTINUATIONS} continuations"),
            ));
        }
        if req.more.len() > MAX_MORE_CONVERSATIONS {
            return Err(bad_request(
                "more",
                format!("at most {MAX_MORE_CONVERSATIONS} further conversations"),
            ));
        }
        let mut conversations = Vec::with_capacity(1 + req.more.len());
        conversations.push(messages);
        for (i, c) in req.more.into_iter().enumerate() {
            let (messages, images) = convert_messages(c.messages, &format!("more[{i}]."))?;
            image_count = image_count.saturating_add(images);
            conversations.push(messages);
        }
        if image_count > 0 {
            self.image_layout(req.tokens_per_image)?;
        }
        let tokens_per_image = self.tokens_per_image(req.tokens_per_image)?;
        self.check_image_tokens(image_count, tokens_per_image)?;
        let this = self.clone();
        let response = blocking(move || {
            this.encode_chat_blocking(
                &conversations,
                req.add_generation_prompt,
                tokens_per_image,
                &req.continuations,
            )
        })
        .await?;
        Ok(Response::new(response))
    }

    async fn encode(
        &self,
        request: Request<pb::EncodeRequest>,
    ) -> Result<Response<pb::EncodeResponse>, Status> {
        let r = request.into_inner();
        let this = self.clone();
        let (ids, image_spans) = blocking(move || {
            this.encode_blocking(
                r.text,
                r.add_special_tokens,
                r.image_count,
                r.tokens_per_image,
            )
        })
        .await?;
        Ok(Response::new(pb::EncodeResponse { ids, image_spans }))
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let r = request.into_inner();
        let vocab = self.tokenizer().vocab_size();
        if let Some(i) = r.ids.iter().position(|&id| id as usize >= vocab) {
            return Err(bad_request(
                format!("ids[{i}]"),
                format!("is outside the vocabulary (size {vocab})"),
            ));
        }
        let this = self.clone();
        let text = blocking(move || {
            this.tokenizer()
                .decode(&r.ids, r.skip_special_tokens)
                .map_err(tokenizer_status)
        })
        .await?;
        Ok(Response::new(pb::DecodeResponse { text }))
    }

    async fn count_tokens(
        &self,
        request: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        let r = request.into_inner();
        let this = self.clone();
        let (ids, _) = blocking(move || {
            this.encode_blocking(
                r.text,
                r.add_special_tokens,
                r.image_count,
                r.tokens_per_image,
            )
        })
        .await?;
        Ok(Response::new(pb::CountTokensResponse {
            count: ids.len() as u32,
        }))
    }

    async fn image_layout(
        &self,
        request: Request<pb::ImageLayoutRequest>,
    ) -> Result<Response<pb::ImageLayoutResponse>, Status> {
        let layout = TokenizerService::image_layout(self, request.into_inner().tokens_per_image)?;
        Ok(Response::new(pb::ImageLayoutResponse {
            image_sequence: layout.sequence(),
            boi_token: layout.boi,
            boi_token_id: layout.boi_id,
            image_token: layout.image,
            image_token_id: layout.image_id,
            eoi_token: layout.eoi,
            eoi_token_id: layout.eoi_id,
            tokens_per_image: layout.tokens_per_image as u32,
        }))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let t = self.tokenizer();
        Ok(Response::new(pb::InfoResponse {
            vocab_size: t.vocab_size() as u32,
            bos_token_id: t.bos_id(),
            eos_token_ids: t.eos_ids().to_vec(),
            chat_template_origin: self.inner.encoder.template().origin().to_string(),
            has_image_tokens: self.inner.encoder.image_tokens().is_some(),
            tokens_per_image: self.inner.tokens_per_image as u32,
        }))
    }
}
