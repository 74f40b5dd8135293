//! Chat messages and the model's own Jinja chat template, rendered with minijinja.
//!
//! The template is never written in this crate: it comes from the model's files
//! (`tokenizer_config.json`, `chat_template.jinja`, `chat_template.json`, GGUF metadata) or, for
//! a base model without one, from the real Gemma 3 `tokenizer_config.json` fetched into the cache
//! ([`ChatTemplate::gemma3_default`]). The environment mirrors transformers'
//! `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, no autoescape, a
//! `raise_exception` function, and `messages`, `bos_token`, `eos_token` and
//! `add_generation_prompt` in the context.

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TokenizerError};
use crate::tokenizer::token_string;

/// The name of the template inside its minijinja environment. No extension: no autoescape.
const TEMPLATE_NAME: &str = "chat";

/// Where the real Gemma 3 tokenizer config sits under the cache directory.
const GEMMA3_CONFIG_IN_CACHE: &str = "demo/tokenizer/tokenizer_config.json";

/// One part of a message's content.
///
/// Serialises to the shapes Hugging Face chat templates expect:
/// `{"type": "text", "text": "..."}` and `{"type": "image"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WirePart", into = "WirePart")]
pub enum ContentPart {
    /// Text.
    Text(String),
    /// An image; the template writes a placeholder (`<start_of_image>` for Gemma 3) that
    /// [`crate::ImageTokens::expand`] then expands.
    Image,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum WirePart {
    Text { text: String },
    Image {},
}

impl From<WirePart> for ContentPart {
    fn from(part: WirePart) -> Self {
        match part {
            WirePart::Text { text } => Self::Text(text),
            WirePart::Image {} => Self::Image,
        }
    }
}

impl From<ContentPart> for WirePart {
    fn from(part: ContentPart) -> Self {
        match part {
            ContentPart::Text(text) => Self::Text { text },
            ContentPart::Image => Self::Image {},
        }
    }
}

/// One chat message: a role (`system`, `user`, `assistant`) and its content parts.
///
/// Serialises as `{"role": ..., "content": [parts]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (Gemma's template writes `assistant` as `model`).
    pub role: String,
    /// The content, in order.
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    /// A message of one role with the given parts.
    pub fn new(role: impl Into<String>, content: Vec<ContentPart>) -> Self {
        Self {
            role: role.into(),
            content,
        }
    }

    /// A system message. Gemma 3's template folds it into the first user turn, and uses only
    /// its first part, which must be text.
    pub fn system(text: impl Into<String>) -> Self {
        Self::new("system", vec![ContentPart::Text(text.into())])
    }

    /// A user message holding only text.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new("user", vec![ContentPart::Text(text.into())])
    }

    /// An assistant (model) message holding only text.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new("assistant", vec![ContentPart::Text(text.into())])
    }

    /// How many image parts the message holds.
    pub fn image_count(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, ContentPart::Image))
            .count()
    }
}

/// Where a chat template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// The model's own, read from this file.
    Model(PathBuf),
    /// The model's own, from the GGUF metadata `tokenizer.chat_template`.
    Gguf,
    /// Not the model's own: the model carries none, and this Gemma 3 template file stands in.
    Gemma3Fallback(PathBuf),
    /// Given as a string by the caller.
    Inline,
}

impl fmt::Display for TemplateOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Model(path) => write!(f, "{}", path.display()),
            Self::Gguf => f.write_str("GGUF metadata tokenizer.chat_template"),
            Self::Gemma3Fallback(path) => write!(f, "Gemma 3 fallback {}", path.display()),
            Self::Inline => f.write_str("inline template"),
        }
    }
}

/// What `raise_exception(...)` in a template carries back to [`ChatTemplate::render`].
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception was called")
            .with_source(RaisedException(message)),
    )
}

/// A compiled chat template and the special tokens it may print.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's text (the prompt pipeline checks its escape sentinel is not in it).
    source: std::sync::Arc<str>,
    bos_token: String,
    eos_token: String,
    origin: TemplateOrigin,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// A template error's kind, detail and line; never the template context (the conversation).
fn describe(error: &minijinja::Error) -> String {
    let mut reason = error.kind().to_string();
    if let Some(detail) = error.detail() {
        reason.push_str(": ");
        reason.push_str(detail);
    }
    if let Some(line) = error.line() {
        reason.push_str(&format!(" (template line {line})"));
    }
    reason
}

/// `chat_template` as configs write it: a string, or a list of `{"name", "template"}` from which
/// the one named `default` is taken.
fn template_source(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|item| item.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|item| item.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::Object(_) => None,
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?).map_err(|e| TokenizerError::InvalidFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the strings the template may print.
    pub fn new(
        source: impl Into<String>,
        bos_token: &str,
        eos_token: &str,
        origin: TemplateOrigin,
    ) -> Result<Self> {
        let source: String = source.into();
        let text: std::sync::Arc<str> = source.as_str().into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TokenizerError::Template {
                origin: origin.to_string(),
                reason: describe(&e),
            })?;
        Ok(Self {
            env,
            source: text,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            origin,
        })
    }

    /// The template of a `tokenizer_config.json` (its `chat_template`, `bos_token` and
    /// `eos_token`).
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config = read_json(path)?;
        let source = config
            .get("chat_template")
            .and_then(template_source)
            .ok_or_else(|| TokenizerError::InvalidFile {
                path: path.to_owned(),
                reason: "no chat_template".into(),
            })?;
        Self::with_config_tokens(source, &config, TemplateOrigin::Model(path.to_owned()))
    }

    fn with_config_tokens(source: String, config: &Value, origin: TemplateOrigin) -> Result<Self> {
        let token = |key: &str| config.get(key).and_then(token_string).unwrap_or_default();
        Self::new(source, &token("bos_token"), &token("eos_token"), origin)
    }

    /// The model's template from the files of a model directory, if it has one: a
    /// `chat_template.jinja`, else a `chat_template.json`, else `chat_template` in
    /// `tokenizer_config.json` (the order transformers uses). Special tokens come from
    /// `tokenizer_config.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source = read_text(&jinja_path)?;
            return Self::with_config_tokens(source, &config, TemplateOrigin::Model(jinja_path))
                .map(Some);
        }
        let json_path = dir.join("chat_template.json");
        if json_path.is_file() {
            let source = read_json(&json_path)?
                .get("chat_template")
                .and_then(template_source)
                .ok_or_else(|| TokenizerError::InvalidFile {
                    path: json_path.clone(),
                    reason: "no chat_template".into(),
                })?;
            return Self::with_config_tokens(source, &config, TemplateOrigin::Model(json_path))
                .map(Some);
        }
        match config.get("chat_template").and_then(template_source) {
            Some(source) => {
                Self::with_config_tokens(source, &config, TemplateOrigin::Model(config_path))
                    .map(Some)
            }
            None => Ok(None),
        }
    }

    /// Where [`gemma3_default`](Self::gemma3_default) looks: the real Gemma 3
    /// `tokenizer_config.json` fetched under the cache directory.
    pub fn gemma3_default_path(cache_dir: impl AsRef<Path>) -> PathBuf {
        cache_dir.as_ref().join(GEMMA3_CONFIG_IN_CACHE)
    }

    /// For a model that carries no template (the demo GGUF is a base model): the Gemma 3 chat
    /// template from the real `tokenizer_config.json` fetched into `cache_dir`. The caller
    /// should report [`fallback_notice`](Self::fallback_notice) to the user.
    pub fn gemma3_default(cache_dir: impl AsRef<Path>) -> Result<Self> {
        let path = Self::gemma3_default_path(cache_dir);
        let mut template = Self::from_tokenizer_config(&path)?;
        template.origin = TemplateOrigin::Gemma3Fallback(path);
        Ok(template)
    }

    /// The template's Jinja text.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Where this template came from.
    pub fn origin(&self) -> &TemplateOrigin {
        &self.origin
    }

    /// For a fallback template, the line to tell the user
    /// (`using the Gemma 3 chat template from <path>`); `None` for the model's own.
    pub fn fallback_notice(&self) -> Option<String> {
        match &self.origin {
            TemplateOrigin::Gemma3Fallback(path) => Some(format!(
                "using the Gemma 3 chat template from {}",
                path.display()
            )),
            TemplateOrigin::Model(_) | TemplateOrigin::Gguf | TemplateOrigin::Inline => None,
        }
    }

    /// The BOS string given to the template.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS string given to the template.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages`; with `add_generation_prompt` the prompt ends with the opening of the
    /// model's turn. Gemma 3 gives
    /// `<bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n`.
    ///
    /// A template that rejects the conversation (roles that do not alternate) gives
    /// [`TokenizerError::ConversationRejected`] with the template's message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template =
            self.env
                .get_template(TEMPLATE_NAME)
                .map_err(|e| TokenizerError::Template {
                    origin: self.origin.to_string(),
                    reason: describe(&e),
                })?;
        template
            .render(context! {
                messages => messages,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                add_generation_prompt => add_generation_prompt,
            })
            .map_err(|e| {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(err) = source {
                    if let Some(raised) = err.downcast_ref::<RaisedException>() {
                        return TokenizerError::ConversationRejected(raised.0.clone());
                    }
                    source = err.source();
                }
                TokenizerError::Template {
                    origin: self.origin.to_string(),
                    reason: describe(&e),
                }
            })
    }
}
