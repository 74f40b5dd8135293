//! The vision service (`medgemma.vision.v1.VisionEncoder`): image or DICOM bytes in, Gemma 3
//! soft-token embeddings out (raw little-endian bytes with dtype and shape), with health,
//! reflection and graceful drain from `medgemma-rpc`. The SigLIP tower and projector run on their
//! own thread behind a bounded queue; a full queue answers RESOURCE_EXHAUSTED. The thread
//! encodes the images of several waiting requests in one tower forward (`--max-batch-images`)
//! and keeps an LRU cache of embeddings by image SHA-256 (`--embedding-cache-bytes`); `Stats`
//! reports both.
//!
//! The tower comes from a MedGemma 4B / Gemma 3 multimodal checkpoint (`--model`), or is the
//! seeded random demo tower sized to a decoder's hidden width (`--demo-text-hidden`), which runs
//! the whole image path but means nothing (said at start-up).
//!
//! In-process use (tests, `medgemma up`):
//!
//! ```ignore
//! let service = VisionService::new(VisionEncoder::demo(640, 0, &Device::Cpu, DType::F32)?, settings)?;
//! let running = medgemma_vision_service::serve(service, "127.0.0.1:0", shutdown, opts).await?;
//! println!("vision listening on {}", running.local_addr); // warmed up, SERVING
//! ```
//!
//! Image bytes and embeddings are never logged.

mod cache;
mod config;
mod error;
mod service;
mod telemetry;

use std::future::Future;

use medgemma_proto::vision::v1::vision_encoder_server::VisionEncoderServer;
use medgemma_rpc::{RpcServer, ServeOptions};
use tonic::server::NamedService;
use tonic::service::Routes;

pub use config::VisionArgs;
pub use error::VisionServiceError;
pub use service::{EmbeddingDType, HoldGuard, VisionService, VisionSettings, VisionStats};

/// The fully qualified service name.
pub const SERVICE_NAME: &str = <VisionEncoderServer<VisionService> as NamedService>::NAME;

/// A vision service serving on a bound address.
pub type RunningVision = medgemma_rpc::Running;

/// Binds `listen`, serves `service`, waits for the encoder's warm-up, then reports SERVING.
pub async fn serve(
    service: VisionService,
    listen: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> Result<RunningVision, VisionServiceError> {
    let watchdog = options.watchdog;
    let server = RpcServer::bind_with(listen, &[SERVICE_NAME], options).await?;
    let warm = service.clone();
    let running = server.spawn(Routes::new(service.into_server()), shutdown);
    warm.warmed().await?;
    running.health.set_serving().await;
    running.watch(warm.pulse().clone(), watchdog);
    Ok(running)
}

/// From the command-line flags: load the tower (on a blocking thread) and serve it.
pub async fn launch(
    args: VisionArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningVision, VisionServiceError> {
    args.validate()?;
    let mut options = ServeOptions {
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout_s),
        watchdog: args.watchdog(),
        ..ServeOptions::default()
    };
    args.tls
        .apply(&mut options)
        .map_err(|e| VisionServiceError::Config(e.to_string()))?;
    let listen = args.listen.clone();
    let service = tokio::task::spawn_blocking(move || args.load())
        .await
        .map_err(|e| VisionServiceError::Config(format!("loading thread failed: {e}")))??;
    if service.is_random() {
        tracing::warn!(
            "the vision tower is the seeded RANDOM demo tower: its embeddings describe nothing \
             (pass --model with a MedGemma 4B checkpoint for real ones)"
        );
    }
    serve(service, &listen, shutdown, options).await
}
