//! The tokenizer service (`medgemma.tokenizer.v1.Tokenizer`): the model's chat template,
//! encode / decode, token counts and the image-token layout, with health, reflection and
//! graceful drain from `medgemma-rpc`. Stateless: any replica answers any request.
//!
//! In-process use (tests, `medgemma up`):
//!
//! ```ignore
//! let service = TokenizerService::new(tokenizer, template, 256);
//! let running = medgemma_tokenizer_service::serve(service, "127.0.0.1:0", shutdown, opts).await?;
//! println!("tokenizer listening on {}", running.local_addr); // already SERVING
//! ```
//!
//! Text and token ids are never logged.

mod config;
mod error;
mod service;

use std::future::Future;

use medgemma_proto::tokenizer::v1::tokenizer_server::TokenizerServer;
use medgemma_rpc::{RpcServer, ServeOptions};
use tonic::server::NamedService;
use tonic::service::Routes;

pub use config::TokenizerArgs;
pub use error::TokenizerServiceError;
pub use service::TokenizerService;

/// The fully qualified service name.
pub const SERVICE_NAME: &str = <TokenizerServer<TokenizerService> as NamedService>::NAME;

/// A tokenizer service serving on a bound address.
pub type RunningTokenizer = medgemma_rpc::Running;

/// Binds `listen`, serves `service`, and reports SERVING (a loaded tokenizer needs no warm-up).
pub async fn serve(
    service: TokenizerService,
    listen: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> Result<RunningTokenizer, TokenizerServiceError> {
    let server = RpcServer::bind_with(listen, &[SERVICE_NAME], options).await?;
    let running = server.spawn(Routes::new(service.into_server()), shutdown);
    running.health.set_serving().await;
    Ok(running)
}

/// From the command-line flags: load the tokenizer (on a blocking thread) and serve it.
pub async fn launch(
    args: TokenizerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningTokenizer, TokenizerServiceError> {
    tracing::info!(
        listen = %args.listen,
        tokenizer = ?args.tokenizer,
        model = ?args.model,
        tokens_per_image = args.tokens_per_image,
        "starting tokenizer service"
    );
    let mut options = ServeOptions {
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout_s),
        ..ServeOptions::default()
    };
    args.tls
        .apply(&mut options)
        .map_err(|e| TokenizerServiceError::Config(e.to_string()))?;
    let listen = args.listen.clone();
    let service = tokio::task::spawn_blocking(move || args.load())
        .await
        .map_err(|e| TokenizerServiceError::Config(format!("loading thread failed: {e}")))??;
    serve(service, &listen, shutdown, options).await
}
