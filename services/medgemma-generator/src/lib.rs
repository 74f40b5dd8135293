//! The generator service (`medgemma.generation.v1.Generator`): one model, run by the engine on
//! its own thread behind a bounded queue; unary and server-streaming generation, `Stats` and
//! `Info`, health, reflection and graceful drain from `medgemma-rpc`.
//!
//! In-process use (tests, `medgemma up`):
//!
//! ```ignore
//! let running = medgemma_generator::serve(config, "127.0.0.1:0", shutdown).await?; // NOT_SERVING
//! println!("generator listening on {}", running.local_addr);
//! running.start(model, tokenizer).await?; // warm-up done, health SERVING
//! ```
//!
//! [`launch`] does both from the command-line flags, loading the model off the runtime.
//!
//! Prompts, token ids and generated text are never logged.

mod config;
mod convert;
mod error;
mod service;
mod telemetry;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use medgemma_model::Gemma3;
use medgemma_proto::generation::v1::generator_server::GeneratorServer;
use medgemma_rpc::{Health, RpcError, RpcServer, ServeOptions};
use medgemma_tokenizer::Tokenizer;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::service::Routes;

pub use config::{GeneratorArgs, GeneratorConfig, device, load_tokenizer, model_id_for};
pub use error::GeneratorError;
pub use service::GeneratorService;

/// The fully qualified service name.
pub const SERVICE_NAME: &str = <GeneratorServer<GeneratorService> as NamedService>::NAME;

/// A generator serving on a bound address.
#[derive(Debug)]
pub struct RunningGenerator {
    /// Where it listens.
    pub local_addr: SocketAddr,
    /// Its health (NOT_SERVING until [`start`](Self::start) completes).
    pub health: Health,
    /// The service (for [`GeneratorService::stats`]).
    pub service: GeneratorService,
    /// The server task; it ends after the shutdown future completes and calls drained.
    pub server: JoinHandle<Result<(), RpcError>>,
}

impl RunningGenerator {
    /// Starts the model thread, warms it up with one token, and flips health to SERVING.
    pub async fn start(
        &self,
        model: Arc<Gemma3>,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<(), GeneratorError> {
        self.service.start(model, tokenizer).await?;
        self.health.set_serving().await;
        if let Some(pulse) = self.service.pulse() {
            tokio::spawn(medgemma_rpc::worker::watchdog(
                self.health.clone(),
                pulse.clone(),
                self.service.config().watchdog,
            ));
        }
        Ok(())
    }
}

/// Binds `listen` and serves a generator with no model yet: health NOT_SERVING, RPCs
/// UNAVAILABLE, until [`RunningGenerator::start`].
pub async fn serve(
    config: GeneratorConfig,
    listen: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningGenerator, GeneratorError> {
    let options = ServeOptions {
        drain_timeout: config.drain_timeout,
        tls: config.tls.clone(),
        health_listen: config.health_listen.clone(),
        ..ServeOptions::default()
    };
    let service = GeneratorService::new(config)?;
    let server = RpcServer::bind_with(listen, &[SERVICE_NAME], options).await?;
    let medgemma_rpc::Running {
        local_addr,
        health,
        server,
    } = server.spawn(Routes::new(service.clone().into_server()), shutdown);
    Ok(RunningGenerator {
        local_addr,
        health,
        service,
        server,
    })
}

/// From the command-line flags: serve, load the model (on a blocking thread), start.
/// `on_bound` sees the address as soon as it is bound, before the model loads.
pub async fn launch(
    args: GeneratorArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<RunningGenerator, GeneratorError> {
    let mut config = args.config();
    config.tls = args
        .tls
        .load()
        .map_err(|e| GeneratorError::Config(e.to_string()))?;
    config.health_listen.clone_from(&args.tls.health_listen);
    config.validate()?;
    args.validate()?;
    tracing::info!(
        listen = %args.listen,
        model = %args.model_path().display(),
        model_id = %config.model_id,
        dtype = ?args.dtype()?,
        device = %args.device,
        queue_capacity = config.queue_capacity,
        default_max_new_tokens = config.default_max_new_tokens,
        kv_cache_bytes = ?config.kv_cache.max_bytes,
        "starting generator"
    );
    let running = serve(config, &args.listen, shutdown).await?;
    on_bound(running.local_addr);
    let (model, tokenizer, plan) = tokio::task::spawn_blocking(move || {
        let (model, tokenizer) = args.load()?;
        let plan = args.memory_plan(&model)?;
        Ok::<_, GeneratorError>((model, tokenizer, plan))
    })
    .await
    .map_err(|_| GeneratorError::WorkerGone)??;
    let kv = plan.map(|(plan, kv)| {
        // As vLLM does: the plan on stderr at start-up, whatever the log level.
        eprintln!("memory plan: {plan}");
        tracing::info!(
            kv_cache_bytes = plan.kv_bytes,
            max_context = plan.max_context,
            max_batch_at_max_context = plan.max_batch_at_max_context,
            max_batch_at_4k = plan.max_batch_at_4k,
            "memory plan"
        );
        kv
    });
    running
        .service
        .start_with(Arc::new(model), Arc::new(tokenizer), kv)
        .await?;
    running.health.set_serving().await;
    Ok(running)
}
