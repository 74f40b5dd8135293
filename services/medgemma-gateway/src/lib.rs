//! The medgemma task gateway: `medgemma.gateway.v1.ClinicalTasks`.
//!
//! Each task renders its prompt with the tokenizer service, generates on a pool of generator
//! replicas (text tasks on the "text" pool; image tasks through the vision service, then the
//! "multimodal" pool), and answers typed fields decoded under a JSON schema, so they always
//! parse. Pools are client-side load balanced (round robin, UNAVAILABLE replicas skipped,
//! DNS re-resolved periodically); deadlines and trace context travel on every hop; a caller
//! that goes away cancels generation.
//!
//! The gateway never logs request content (questions, notes, images, generated text).
//!
//! ```ignore
//! let gw = GatewayServer::bind(args).await?;
//! println!("gateway listening on {}", gw.local_addr());
//! gw.serve(medgemma_rpc::shutdown_signal()).await?;
//! ```

pub mod audit;
pub mod auth;
pub mod config;
pub mod error;
pub mod pool;
pub mod prompt;
pub mod service;
pub mod structured;
pub mod tasks;
mod telemetry;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use medgemma_proto::gateway::v1::clinical_tasks_server::{ClinicalTasksServer, SERVICE_NAME};
use medgemma_rpc::{Health, RpcError, RpcServer, ServeOptions};
use tonic::service::Routes;

pub use config::GatewayArgs;
pub use error::GatewayError;
pub use pool::Pool;
pub use service::ClinicalTasksService;
pub use tasks::Tasks;

/// A bound gateway, pools resolved, not yet serving.
#[derive(Debug)]
pub struct GatewayServer {
    server: RpcServer,
    service: ClinicalTasksService,
    pools: Vec<Arc<Pool>>,
    resolve_interval: Duration,
    /// The largest request the gateway decodes.
    max_message_bytes: usize,
    guard: Arc<auth::Guard>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding failed.
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

impl GatewayServer {
    /// Checks `args`, resolves the pools once and binds the listen address. Empty pools are
    /// allowed (their tasks answer UNAVAILABLE saying which flag to set).
    pub async fn bind(args: GatewayArgs) -> Result<Self, StartError> {
        args.validate().map_err(StartError::Config)?;
        let config = |e: medgemma_rpc::tls::TlsError| StartError::Config(e.to_string());
        let server_tls = args.tls.load().map_err(config)?;
        let pool_tls = args
            .pool_tls
            .load(args.tls.reload_interval().map_err(config)?)
            .map_err(config)?;
        // Every pool with the same retry policy and TLS towards its replicas.
        let pool = |name: &'static str, flag: &'static str, targets: &[String]| {
            Arc::new(
                Pool::new(name, flag, targets.to_vec())
                    .with_retries(args.max_attempts, args.retry_budget)
                    .with_tls(pool_tls.clone()),
            )
        };
        let tokenizer = pool(
            "tokenizer",
            "--tokenizer-addr / MEDGEMMA_TOKENIZER_ADDR",
            &args.tokenizer_addr,
        );
        let text = pool("text", "--text-pool / MEDGEMMA_TEXT_POOL", &args.text_pool);
        let multimodal = pool(
            "multimodal",
            "--multimodal-pool / MEDGEMMA_MULTIMODAL_POOL",
            &args.multimodal_pool,
        );
        let vision = pool(
            "vision",
            "--vision-pool / MEDGEMMA_VISION_POOL",
            &args.vision_pool,
        );
        let pools = vec![
            tokenizer.clone(),
            text.clone(),
            multimodal.clone(),
            vision.clone(),
        ];
        for p in &pools {
            p.refresh().await;
            if p.targets().is_empty() {
                tracing::warn!(
                    pool = p.name(),
                    "pool not configured; its tasks answer UNAVAILABLE"
                );
            } else {
                tracing::info!(pool = p.name(), targets = ?p.targets(), replicas = ?p.addrs(), "pool");
            }
        }
        let tasks = Arc::new(
            Tasks::new(tokenizer, text, multimodal, vision, args.disclaimer.clone())
                .with_max_input_tokens(args.max_input_tokens),
        );
        let timeout = (!args.request_timeout.is_zero()).then_some(args.request_timeout);
        let server = RpcServer::bind_with(
            &args.listen,
            &[SERVICE_NAME],
            ServeOptions {
                drain_timeout: args.drain_timeout,
                tls: server_tls.clone(),
                reflection: args.auth.reflection,
                health_listen: args.tls.health_listen.clone(),
                ..ServeOptions::default()
            },
        )
        .await?;
        let service = ClinicalTasksService::new(tasks, validate::Limits::from(&args), timeout)
            .with_stream_settings(service::StreamSettings {
                send_timeout: args.stream_send_timeout,
                drain_expired: server.drain_expired(),
            });
        // A request is at most one image and the text fields: just above the image limit.
        let max_message_bytes = args.max_image_bytes + 4 * args.max_text_bytes + (64 << 10);
        let client_ca = server_tls.is_some_and(|t| t.requires_client_cert());
        let loopback = server.local_addr().ip().is_loopback();
        let guard =
            auth::Guard::from_args(&args.auth, loopback, client_ca).map_err(StartError::Config)?;
        Ok(Self {
            server,
            service,
            pools,
            resolve_interval: args.resolve_interval,
            max_message_bytes,
            guard: Arc::new(guard),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The health handle (SERVING once [`serve`](Self::serve) starts).
    pub fn health(&self) -> Health {
        self.server.health()
    }

    /// Serves until `shutdown` completes, then drains. Pools are re-resolved meanwhile.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RpcError> {
        let resolver = tokio::spawn(pool::resolve_forever(
            self.pools.clone(),
            self.resolve_interval,
        ));
        let routes = Routes::new(auth::Guarded::new(
            ClinicalTasksServer::new(self.service)
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(medgemma_rpc::MAX_MESSAGE_BYTES),
            self.guard,
        ));
        let health = self.server.health();
        // Stateless: ready as soon as it accepts; NOT_SERVING while a pool has no healthy
        // replica. The watcher stops when the drain starts (the drain owns health then).
        health.set_serving().await;
        let watcher = tokio::spawn(pool::watch_pools(self.pools, health, pool::HEALTH_INTERVAL));
        let stop_watching = watcher.abort_handle();
        let shutdown = async move {
            shutdown.await;
            stop_watching.abort();
        };
        let r = self.server.serve(routes, shutdown).await;
        resolver.abort();
        r
    }
}
