//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer, rendering a chat or encoding text.
///
/// Messages name the file or the piece of metadata at fault. They never carry prompt text: the
/// text given to `encode`, the messages of a chat and decoded output may hold patient data.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No `tokenizer.json` where one was expected.
    #[error("no tokenizer.json at {0} (give a tokenizer.json or a directory holding one)")]
    NotFound(PathBuf),
    /// A file was read but its content is not what it should be (bad JSON, bad tokenizer.json,
    /// a field of the wrong type).
    #[error("invalid {path}: {reason}")]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer metadata of a GGUF file is missing, of the wrong type or unsupported.
    #[error("GGUF tokenizer metadata: {0}")]
    Gguf(String),
    /// A special token the caller or a config names is not in the vocabulary.
    #[error("token {token:?} ({what}) is not in the vocabulary")]
    UnknownToken {
        /// The token's text, as written in the config (never prompt text).
        token: String,
        /// What it was needed for.
        what: &'static str,
    },
    /// A token id outside the vocabulary was given to decode.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    InvalidTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size, added tokens included.
        vocab_size: usize,
    },
    /// The `tokenizers` library failed to encode or decode.
    #[error("tokenizer failed to {op}: {reason}")]
    Tokenizers {
        /// `"encode"`, `"decode"` or `"serialize"`.
        op: &'static str,
        /// The library's message.
        reason: String,
    },
    /// The chat template does not compile, or failed while rendering for a reason other than
    /// rejecting the conversation.
    #[error("chat template ({origin}): {reason}")]
    Template {
        /// Where the template came from.
        origin: String,
        /// What went wrong (template line numbers, never the conversation).
        reason: String,
    },
    /// The chat template itself refused the conversation with `raise_exception` (for Gemma 3:
    /// roles that do not alternate user/assistant, or content of an invalid type).
    #[error("the chat template rejected the conversation: {0}")]
    ConversationRejected(String),
    /// Text that cannot be encoded as the caller's ordinary text (never quoted).
    #[error("text cannot be encoded: {0}")]
    InvalidText(String),
    /// Image placeholders in a prompt do not match the images given, or the token ids after
    /// encoding do not hold the expected number of image tokens.
    #[error("image placeholders: {0}")]
    ImagePlaceholders(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
