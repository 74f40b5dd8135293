//! [`Tokenizer`]: a `tokenizers::Tokenizer` plus what the model's configs say about it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Content;
use serde_json::Value;

use crate::chat::{ChatTemplate, TemplateOrigin};
use crate::error::{Result, TokenizerError};
use crate::image::ImageTokens;
use crate::literal::Specials;

/// Gemma stops generation on either of these: `<end_of_turn>` ends a chat turn, `<eos>` a
/// document. Stopping on `<eos>` alone lets an instruction-tuned model run to the token limit,
/// and a GGUF names only `<eos>`, so both are looked up (by name, ids from the vocabulary).
const GEMMA_STOP_TOKENS: [&str; 2] = ["<eos>", "<end_of_turn>"];

/// Adds the ids of [`GEMMA_STOP_TOKENS`] that the vocabulary holds to `eos_ids`.
pub(crate) fn add_gemma_stop_tokens(inner: &tokenizers::Tokenizer, eos_ids: &mut Vec<u32>) {
    for name in GEMMA_STOP_TOKENS {
        if let Some(id) = inner.token_to_id(name)
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
    }
}

/// Special tokens a `tokenizer_config.json` names by string (multimodal Gemma 3 only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ConfigTokens {
    boi: Option<String>,
    eoi: Option<String>,
    image: Option<String>,
}

/// A text tokenizer for Gemma 3 / MedGemma, from a `tokenizer.json` or from GGUF metadata.
///
/// [`encode`](Self::encode) never adds special tokens other than one BOS, and never a second
/// BOS in front of text that already starts with one (a rendered chat template does).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos_token: bool,
    config_tokens: ConfigTokens,
    chat_template: Option<ChatTemplate>,
    vocab_size: usize,
    /// Built on first use (it holds a second copy of the vocabulary): only what encodes chats
    /// with [`crate::PromptEncoder`] needs it.
    specials: OnceLock<std::result::Result<Specials, String>>,
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| TokenizerError::InvalidFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// A special token as `tokenizer_config.json` writes it: `"<bos>"` or `{"content": "<bos>", ...}`.
pub(crate) fn token_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_owned),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::Array(_) => None,
    }
}

/// A key of `tokenizer_config.json`, at top level or under `extra_special_tokens`.
fn config_token(config: &Value, key: &str) -> Option<String> {
    config.get(key).and_then(token_string).or_else(|| {
        config
            .get("extra_special_tokens")?
            .get(key)
            .and_then(token_string)
    })
}

impl Tokenizer {
    /// Loads `tokenizer.json` from `path`, which is that file or a directory holding it.
    ///
    /// Beside it, these optional files are read: `tokenizer_config.json` (BOS and EOS tokens,
    /// `add_bos_token`, the image tokens, the chat template), `generation_config.json`
    /// (`eos_token_id`), and `chat_template.jinja` or `chat_template.json` (a template saved
    /// apart from the config, which then wins). BOS falls back to `<bos>` when no config names
    /// one; `<eos>` and `<end_of_turn>` are always stop tokens when the vocabulary has them.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (json_path, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_owned())
        } else {
            let dir = path
                .parent()
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from("."));
            (path.to_owned(), dir)
        };
        if !json_path.is_file() {
            return Err(TokenizerError::NotFound(json_path));
        }
        let inner = tokenizers::Tokenizer::from_file(&json_path).map_err(|e| {
            TokenizerError::InvalidFile {
                path: json_path.clone(),
                reason: e.to_string(),
            }
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let generation_path = dir.join("generation_config.json");
        let generation = if generation_path.is_file() {
            Some(read_json(&generation_path)?)
        } else {
            None
        };

        let lookup = |token: String, what: &'static str, file: &Path| -> Result<u32> {
            inner
                .token_to_id(&token)
                .ok_or_else(|| TokenizerError::InvalidFile {
                    path: file.to_owned(),
                    reason: TokenizerError::UnknownToken { token, what }.to_string(),
                })
        };

        let bos_token = config.as_ref().and_then(|c| config_token(c, "bos_token"));
        let bos_id = match bos_token {
            Some(token) => Some(lookup(token, "bos_token", &config_path)?),
            None => inner.token_to_id("<bos>"),
        };

        let mut eos_ids = Vec::new();
        if let Some(token) = config.as_ref().and_then(|c| config_token(c, "eos_token")) {
            eos_ids.push(lookup(token, "eos_token", &config_path)?);
        }
        if let Some(value) = generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            let ids = match value {
                Value::Array(items) => items.iter().map(Value::as_u64).collect::<Option<Vec<_>>>(),
                Value::Number(n) => n.as_u64().map(|id| vec![id]),
                Value::Null | Value::Bool(_) | Value::String(_) | Value::Object(_) => None,
            }
            .ok_or_else(|| TokenizerError::InvalidFile {
                path: generation_path.clone(),
                reason: "eos_token_id is not a token id or a list of token ids".into(),
            })?;
            for id in ids {
                let id = u32::try_from(id).map_err(|_| TokenizerError::InvalidFile {
                    path: generation_path.clone(),
                    reason: format!("eos_token_id {id} is out of range"),
                })?;
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        add_gemma_stop_tokens(&inner, &mut eos_ids);

        let add_bos_token = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let config_tokens = config
            .as_ref()
            .map(|c| ConfigTokens {
                boi: config_token(c, "boi_token"),
                eoi: config_token(c, "eoi_token"),
                image: config_token(c, "image_token"),
            })
            .unwrap_or_default();

        let chat_template = ChatTemplate::from_model_dir(&dir)?;
        let vocab_size = inner.get_vocab_size(true);
        tracing::debug!(
            path = %json_path.display(),
            vocab_size,
            ?bos_id,
            ?eos_ids,
            chat_template = chat_template.is_some(),
            "loaded tokenizer"
        );
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
            add_bos_token,
            config_tokens,
            chat_template,
            vocab_size,
            specials: OnceLock::new(),
        })
    }

    /// [`from_gguf`](Self::from_gguf) on the header of the GGUF file at `path`.
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        let content = Content::read(&mut file).map_err(|e| TokenizerError::InvalidFile {
            path: path.to_owned(),
            reason: format!("not a readable GGUF file: {e}"),
        })?;
        Self::from_gguf(&content)
    }

    /// Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    ///
    /// For Gemma 3 this gives the same ids as the model's `tokenizer.json`: see the `gguf`
    /// module for how the BPE merges are recovered. The chat template is read from
    /// `tokenizer.chat_template` when the file has one (base models do not).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let built = crate::gguf::build(content)?;
        let chat_template = match built.chat_template {
            Some(source) => {
                let piece = |id: Option<u32>| {
                    id.and_then(|id| built.inner.id_to_token(id))
                        .unwrap_or_default()
                };
                let bos = piece(built.bos_id);
                let eos = piece(built.eos_ids.first().copied());
                Some(ChatTemplate::new(source, &bos, &eos, TemplateOrigin::Gguf)?)
            }
            None => None,
        };
        let vocab_size = built.inner.get_vocab_size(true);
        Ok(Self {
            inner: built.inner,
            bos_id: built.bos_id,
            eos_ids: built.eos_ids,
            add_bos_token: built.add_bos_token,
            config_tokens: ConfigTokens::default(),
            chat_template,
            vocab_size,
            specials: OnceLock::new(),
        })
    }

    /// Token ids for `text`. Special tokens written in the text (`<start_of_turn>`, `<bos>`...)
    /// become their single ids. With `add_bos`, BOS is put in front unless the ids already start
    /// with it, so a rendered chat template (which begins with `<bos>`) keeps exactly one. A
    /// tokenizer without a BOS token ignores `add_bos`.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner
                .encode_fast(text, false)
                .map_err(|e| TokenizerError::Tokenizers {
                    op: "encode",
                    reason: e.to_string(),
                })?;
        let mut ids = encoding.get_ids().to_vec();
        if add_bos
            && let Some(bos) = self.bos_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Token ids for `text` taken as ordinary text: special-token strings in it (`<bos>`,
    /// `<start_of_turn>`...) are encoded like any other text, and no BOS is added. What a
    /// caller's text appended to a prompt's ids needs.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.specials()?.encode_plain(text)
    }

    /// The ids of the special tokens (`<bos>`, `<eos>`, `<start_of_turn>`, `<end_of_turn>`, the
    /// image tokens...), in id order.
    pub fn special_ids(&self) -> Result<&[u32]> {
        Ok(self.specials()?.ids())
    }

    pub(crate) fn specials(&self) -> Result<&Specials> {
        self.specials
            .get_or_init(|| Specials::new(&self.inner).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|reason| TokenizerError::Tokenizers {
                op: "index special tokens",
                reason: reason.clone(),
            })
    }

    /// Text for `ids`; with `skip_special`, special tokens (`<bos>`, `<end_of_turn>`...) are
    /// left out. Byte-fallback pieces are joined into UTF-8; invalid bytes become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Tokenizers {
                op: "decode",
                reason: e.to_string(),
            })
    }

    /// Fails on the first id outside the vocabulary.
    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::InvalidTokenId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// The id of a token, added and special tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The piece of an id, as the vocabulary spells it (`▁the`, `<0xE8>`, `<end_of_turn>`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included (262,145 for Gemma 3's `tokenizer.json` with
    /// `<image_soft_token>`, 262,144 for a GGUF).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The BOS id, from the config or GGUF metadata.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Ids that end generation: the configured EOS, `generation_config.json`'s or the GGUF's
    /// EOS/EOT ids, and `<eos>` and `<end_of_turn>` when present (Gemma 3: `[106, 1]` from
    /// `tokenizer.json`, `[1, 106]` from a GGUF).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Whether the model's config asks for BOS in front of plain text (`add_bos_token`).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// The model's own chat template, if its files carry one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The image tokens named by `tokenizer_config.json` (`boi_token`, `image_token`,
    /// `eoi_token`), with `tokens_per_image` soft tokens per image (256 for Gemma 3).
    pub fn image_tokens(&self, tokens_per_image: usize) -> Result<ImageTokens> {
        let missing = |key: &str| {
            TokenizerError::ImagePlaceholders(format!(
                "tokenizer_config.json names no {key} (a text-only tokenizer?)"
            ))
        };
        let t = &self.config_tokens;
        ImageTokens::from_strings(
            self,
            t.boi.as_deref().ok_or_else(|| missing("boi_token"))?,
            t.image.as_deref().ok_or_else(|| missing("image_token"))?,
            t.eoi.as_deref().ok_or_else(|| missing("eoi_token"))?,
            tokens_per_image,
        )
    }

    /// The underlying `tokenizers` tokenizer (for llguidance and the like).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The tokenizer serialised as `tokenizer.json`, e.g. for a library built against another
    /// `tokenizers` version, or to save the tokenizer rebuilt from a GGUF.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| TokenizerError::Tokenizers {
                op: "serialize",
                reason: e.to_string(),
            })
    }
}
