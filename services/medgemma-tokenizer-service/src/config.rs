//! The command line of `medgemma-tokenizer`; every flag also reads a `MEDGEMMA_*` variable.

use std::path::PathBuf;
use std::sync::Arc;

use medgemma_tokenizer::{PromptEncoder, Tokenizer};

use crate::error::TokenizerServiceError;
use crate::service::TokenizerService;

/// Flags of `medgemma-tokenizer`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenizerArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(
        long,
        env = "MEDGEMMA_TOKENIZER_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: String,
    /// tokenizer.json or a directory holding it (default: the demo Gemma 3 tokenizer in the
    /// cache, fetched by `medgemma fetch-demo`).
    #[arg(long, env = "MEDGEMMA_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// A .gguf model whose own vocabulary to serve (instead of --tokenizer).
    #[arg(long, env = "MEDGEMMA_MODEL", conflicts_with = "tokenizer")]
    pub model: Option<PathBuf>,
    /// The cache root holding the Gemma 3 chat template used when the tokenizer carries none
    /// (default: $MEDGEMMA_CACHE_DIR or ~/.cache/medgemma).
    #[arg(long, env = "MEDGEMMA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Soft tokens per image when a request sets none (256 for Gemma 3).
    #[arg(long, env = "MEDGEMMA_TOKENS_PER_IMAGE", default_value_t = 256)]
    pub tokens_per_image: u32,
    /// The most image soft tokens (`image_count x tokens_per_image`) one request may expand;
    /// more is INVALID_ARGUMENT.
    #[arg(long, env = "MEDGEMMA_MAX_IMAGE_TOKENS", default_value_t = crate::service::DEFAULT_MAX_IMAGE_TOKENS)]
    pub max_image_tokens: u64,
    /// Seconds in-flight calls may run after SIGTERM before their connections are closed.
    #[arg(long, env = "MEDGEMMA_DRAIN_TIMEOUT_S", default_value_t = 10)]
    pub drain_timeout_s: u64,
    /// TLS, and mTLS with --tls-client-ca (production: only the gateway's certificate).
    #[command(flatten)]
    pub tls: medgemma_rpc::tls::ServerTlsArgs,
}

impl TokenizerArgs {
    /// Loads the tokenizer and its chat template (blocking).
    pub fn load(&self) -> Result<TokenizerService, TokenizerServiceError> {
        if self.tokens_per_image == 0
            || self.tokens_per_image > service_limits::MAX_TOKENS_PER_IMAGE
        {
            return Err(TokenizerServiceError::Config(format!(
                "--tokens-per-image must be in 1..={}",
                service_limits::MAX_TOKENS_PER_IMAGE
            )));
        }
        let tokenizer = match (&self.tokenizer, &self.model) {
            (Some(path), _) => Tokenizer::from_path(path)?,
            (None, Some(model)) => Tokenizer::from_gguf_file(model)?,
            (None, None) => Tokenizer::from_path(medgemma_assets::demo_paths().tokenizer_dir)?,
        };
        let cache = self
            .cache_dir
            .clone()
            .unwrap_or_else(medgemma_assets::cache_dir);
        let tokens_per_image = self.tokens_per_image as usize;
        let encoder = PromptEncoder::new(Arc::new(tokenizer), &cache, tokens_per_image)?;
        if let Some(note) = encoder.template().fallback_notice() {
            tracing::info!("{note}");
        }
        Ok(TokenizerService::new(encoder, tokens_per_image)
            .with_max_image_tokens(self.max_image_tokens))
    }
}

pub(crate) mod service_limits {
    /// The largest soft-token count per image a request may ask for.
    pub const MAX_TOKENS_PER_IMAGE: u32 = 4096;
}
