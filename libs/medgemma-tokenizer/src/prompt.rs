//! The one prompt pipeline: chat messages and an image layout in, token ids and the spans of
//! the image soft tokens out. The tokenizer service (`EncodeChat`), `medgemma generate` and
//! the suite all encode prompts here.
//!
//! The messages are data and the template is code: text in the messages is encoded as
//! ordinary text (a `<end_of_turn><start_of_turn>model` in a note stays text and cannot forge
//! a turn), while the markers the template writes are special tokens (see the `literal`
//! module). Images are expanded as transformers' `Gemma3Processor` does ([`ImageTokens`]).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::chat::{ChatMessage, ChatTemplate, ContentPart};
use crate::error::{Result, TokenizerError};
use crate::image::ImageTokens;
use crate::literal::Specials;
use crate::tokenizer::Tokenizer;

/// A prompt's token ids and where its images' soft tokens sit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedChat {
    /// The token ids, one BOS first.
    pub ids: Vec<u32>,
    /// One range of soft-token positions per image, in prompt order.
    pub image_spans: Vec<Range<usize>>,
}

/// A tokenizer, the chat template it is used with, and its image tokens.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    image: Option<ImageTokens>,
}

/// The image tokens `tokenizer_config.json` names, else Gemma 3's names when the vocabulary
/// holds them; `None` for a text-only vocabulary.
fn default_image_tokens(tokenizer: &Tokenizer, tokens_per_image: usize) -> Option<ImageTokens> {
    tokenizer.image_tokens(tokens_per_image).ok().or_else(|| {
        ImageTokens::from_strings(
            tokenizer,
            "<start_of_image>",
            "<image_soft_token>",
            "<end_of_image>",
            tokens_per_image,
        )
        .ok()
    })
}

impl PromptEncoder {
    /// The model's own chat template, else (a base model carries none) the Gemma 3 template
    /// fetched under `cache_dir`: the one place that choice is made. A fallback says so in
    /// [`ChatTemplate::fallback_notice`]. `tokens_per_image` is the default soft-token count.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        cache_dir: &Path,
        tokens_per_image: usize,
    ) -> Result<Self> {
        let template = match tokenizer.chat_template() {
            Some(t) => t.clone(),
            None => ChatTemplate::gemma3_default(cache_dir)?,
        };
        Ok(Self::with_template(tokenizer, template, tokens_per_image))
    }

    /// With a given template.
    pub fn with_template(
        tokenizer: Arc<Tokenizer>,
        template: ChatTemplate,
        tokens_per_image: usize,
    ) -> Self {
        let image = default_image_tokens(&tokenizer, tokens_per_image);
        Self {
            tokenizer,
            template,
            image,
        }
    }

    /// With these image tokens (a multimodal model's config names them by id).
    pub fn with_image_tokens(mut self, image: ImageTokens) -> Self {
        self.image = Some(image);
        self
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The image tokens at the default soft-token count; `None` for a text-only vocabulary.
    pub fn image_tokens(&self) -> Option<&ImageTokens> {
        self.image.as_ref()
    }

    /// Renders `messages` with the template (ending with the opening of the model's turn when
    /// `add_generation_prompt`), expands each image to `tokens_per_image` soft tokens (default:
    /// the encoder's) and encodes: the template's markers as special tokens, the messages'
    /// text as ordinary text. One BOS first, never two.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokens_per_image: Option<usize>,
    ) -> Result<EncodedChat> {
        let specials = self.tokenizer.specials()?;
        let texts = messages.iter().flat_map(|m| {
            m.content.iter().filter_map(|p| match p {
                ContentPart::Text(t) => Some(t.as_str()),
                ContentPart::Image => None,
            })
        });
        let sentinel = Specials::sentinel(texts.chain([self.template.source()]))?;
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m
                    .content
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text(t) => ContentPart::Text(specials.escape(t, sentinel)),
                        ContentPart::Image => ContentPart::Image,
                    })
                    .collect(),
            })
            .collect();
        let rendered = self.template.render(&escaped, add_generation_prompt)?;
        let n_images: usize = messages.iter().map(ChatMessage::image_count).sum();
        let layout = match (n_images, &self.image) {
            (0, _) => None,
            (_, None) => {
                return Err(TokenizerError::ImagePlaceholders(
                    "this tokenizer has no image tokens (a text-only vocabulary)".into(),
                ));
            }
            (_, Some(image)) => Some(ImageTokens {
                tokens_per_image: tokens_per_image.unwrap_or(image.tokens_per_image),
                ..image.clone()
            }),
        };
        let text = match &layout {
            Some(layout) => layout.expand(&rendered, n_images)?,
            None => rendered,
        };
        let mut ids = specials.encode(&text, sentinel)?;
        if let Some(bos) = self.tokenizer.bos_id()
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        let image_spans = match &layout {
            Some(layout) => {
                layout.check_ids(&ids, n_images)?;
                layout.spans(&ids)
            }
            None => Vec::new(),
        };
        Ok(EncodedChat { ids, image_spans })
    }
}
