//! The one error type of the engine crate.

use medgemma_model::ModelError;
use medgemma_tokenizer::TokenizerError;

use crate::constraint::ConstraintError;
use crate::sampling::SamplingError;

/// Everything that can fail while generating. Messages never carry prompt content.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("invalid sampling parameters: {0}")]
    Sampling(#[from] SamplingError),
    #[error("constrained decoding: {0}")]
    Constraint(#[from] ConstraintError),
    #[error(
        "prompt of {prompt_tokens} tokens does not fit the model's context of {context} tokens"
    )]
    ContextExceeded {
        prompt_tokens: usize,
        context: usize,
    },
    #[error(
        "prompt of {tokens} tokens is over the limit of {limit} input tokens (--max-input-tokens)"
    )]
    InputTooLong { tokens: usize, limit: usize },
    #[error(
        "prompt of {prompt_tokens} tokens needs {need_bytes} bytes of KV cache, more than the \
         whole cache of {limit_bytes} bytes (--kv-cache-bytes)"
    )]
    KvCapacity {
        prompt_tokens: usize,
        need_bytes: usize,
        limit_bytes: usize,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(e))
    }
}

/// Result alias of the engine crate.
pub type Result<T> = std::result::Result<T, EngineError>;
