//! The crate's error type.

/// What can fail while starting the tokenizer service.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerServiceError {
    /// Loading the tokenizer or its chat template failed.
    #[error("loading the tokenizer: {0}")]
    Tokenizer(#[from] medgemma_tokenizer::TokenizerError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding or serving failed.
    #[error(transparent)]
    Rpc(#[from] medgemma_rpc::RpcError),
}
