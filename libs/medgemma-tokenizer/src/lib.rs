//! Tokenizer, chat template and image-token layout for Gemma 3 / MedGemma.
//!
//! - [`Tokenizer`]: from a `tokenizer.json` (+ `tokenizer_config.json`) or rebuilt from a GGUF's
//!   metadata with the same ids; `encode` never doubles BOS.
//! - [`ChatTemplate`]: the model's own Jinja template rendered with minijinja, over
//!   [`ChatMessage`]s; for a model without one, the real Gemma 3 template from the cache.
//! - [`ImageTokens`] / [`expand_image_placeholders`]: each `<start_of_image>` becomes the
//!   `\n\n<start_of_image>` + N x `<image_soft_token>` + `<end_of_image>\n\n` text that
//!   transformers' `Gemma3Processor` makes, then a check of the encoded ids.
//! - [`PromptEncoder`]: the one prompt pipeline, messages + image layout -> token ids + image
//!   spans; the messages' text is ordinary text (it cannot forge turns), the template's markers
//!   are special tokens.
//! - [`IncrementalDecoder`]: streamed text that never breaks a UTF-8 character.
//!
//! Nothing here logs or puts into errors the text being encoded, rendered or decoded.

mod chat;
mod error;
mod gguf;
mod image;
mod literal;
mod prompt;
mod stream;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, ContentPart, TemplateOrigin};
pub use error::{Result, TokenizerError};
pub use image::{ImageTokens, count_image_tokens, expand_image_placeholders, image_sequence};
pub use prompt::{EncodedChat, PromptEncoder};
pub use stream::IncrementalDecoder;
pub use tokenizer::Tokenizer;
