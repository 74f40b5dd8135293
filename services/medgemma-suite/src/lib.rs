//! The whole medgemma suite in one process: tokenizer, vision, a text and a multimodal
//! generator, and the gateway, each a real gRPC server from its own service crate, bound on
//! loopback. `medgemma up` runs it for a laptop; the end-to-end tests drive it.
//!
//! On the demo assets both generator pools run the demo decoder (one copy of the weights, a
//! model thread and KV cache per generator); the multimodal one is paired with a seeded *random*
//! SigLIP tower and projector sized to the decoder's hidden width, so the image path runs end to
//! end but reports describe nothing real.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use medgemma_gateway::{GatewayArgs, GatewayServer};
use medgemma_generator::{GeneratorConfig, GeneratorService, RunningGenerator};
use medgemma_model::{Gemma3, LoadOptions};
use medgemma_tokenizer::Tokenizer;
use medgemma_vision::VisionEncoder;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What can fail while starting the suite.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("demo assets: {0}")]
    Assets(#[from] medgemma_assets::AssetError),
    #[error("loading the demo model: {0}")]
    Model(#[from] medgemma_model::ModelError),
    #[error("loading the tokenizer: {0}")]
    Tokenizer(#[from] medgemma_tokenizer::TokenizerError),
    #[error("tokenizer service: {0}")]
    TokenizerService(#[from] medgemma_tokenizer_service::TokenizerServiceError),
    #[error("vision service: {0}")]
    VisionService(#[from] medgemma_vision_service::VisionServiceError),
    #[error("generator: {0}")]
    Generator(#[from] medgemma_generator::GeneratorError),
    #[error("gateway: {0}")]
    Gateway(#[from] medgemma_gateway::StartError),
    #[error("demo vision tower: {0}")]
    Vision(#[from] medgemma_vision::VisionError),
    #[error("a loading thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("tls: {0}")]
    Tls(#[from] medgemma_rpc::tls::TlsError),
}

/// How to start the suite.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// The host every service binds (each on a free port, except the gateway).
    pub host: String,
    /// The gateway's address (`127.0.0.1:0` picks a free port).
    pub gateway_listen: String,
    /// The cache root of the demo assets (default: `$MEDGEMMA_CACHE_DIR` or ~/.cache/medgemma).
    pub cache_dir: Option<PathBuf>,
    /// Download missing demo assets (else they must be there).
    pub fetch: bool,
    /// Generators in the text pool.
    pub text_replicas: usize,
    /// The gateway's disclaimer.
    pub disclaimer: String,
    /// Drain bound of every server at shutdown.
    pub drain_timeout: Duration,
    /// Requests each generator lets wait beyond its running ones; one more gets
    /// RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Sequences each generator runs at once (continuous batching).
    pub max_running: usize,
    /// TLS on every hop (`None`: plaintext on loopback): the backends require the gateway's
    /// client certificate (mTLS), the gateway serves TLS with the same certificate.
    pub tls: Option<SuiteTls>,
}

/// The certificate files of a suite run with TLS (`medgemma up --tls`, from a
/// [`medgemma_rpc::tls::DevCa`]).
#[derive(Debug, Clone)]
pub struct SuiteTls {
    /// Every server's certificate and key, and the CA clients of the backends must chain to.
    pub server: medgemma_rpc::tls::ServerTlsFiles,
    /// The gateway's side towards the backends: the CA and its client certificate.
    pub client: medgemma_rpc::tls::ClientTlsFiles,
}

impl SuiteTls {
    fn backend(&self) -> Result<medgemma_rpc::tls::ServerTls, SuiteError> {
        Ok(medgemma_rpc::tls::ServerTls::load(
            self.server.clone(),
            Duration::from_secs(10),
        )?)
    }

    /// Points the gateway's flags at these files.
    fn apply(&self, args: &mut GatewayArgs) {
        args.tls.tls_cert = Some(self.server.cert.clone());
        args.tls.tls_key = Some(self.server.key.clone());
        args.pool_tls.tls_ca = Some(self.client.ca.clone());
        if let Some((cert, key)) = &self.client.identity {
            args.pool_tls.tls_client_cert = Some(cert.clone());
            args.pool_tls.tls_client_key = Some(key.clone());
        }
    }
}

impl Default for SuiteOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            gateway_listen: "127.0.0.1:0".into(),
            cache_dir: None,
            fetch: true,
            text_replicas: 1,
            disclaimer: medgemma_gateway::prompt::DEFAULT_DISCLAIMER.into(),
            drain_timeout: Duration::from_secs(8),
            queue_capacity: GeneratorConfig::new("").queue_capacity,
            max_running: GeneratorConfig::new("").scheduler.max_running,
            tls: None,
        }
    }
}

/// One running server: its address and how to stop it.
#[derive(Debug)]
pub struct Server {
    /// `tokenizer`, `vision`, `generator` or `gateway`.
    pub name: &'static str,
    /// Where it listens.
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), medgemma_rpc::RpcError>>,
}

impl Server {
    fn new(
        name: &'static str,
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: JoinHandle<Result<(), medgemma_rpc::RpcError>>,
    ) -> Self {
        Self {
            name,
            addr,
            stop,
            task,
        }
    }

    /// Stops it (health NOT_SERVING, no new connections, in-flight calls drained) and waits
    /// at most `bound`. The message says what went wrong, if anything.
    pub async fn stop(self, bound: Duration) -> Result<(), String> {
        let _ = self.stop.send(true);
        match tokio::time::timeout(bound, self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("{} at {}: {e}", self.name, self.addr)),
            Ok(Err(e)) => Err(format!("{} at {}: task failed: {e}", self.name, self.addr)),
            Err(_) => Err(format!(
                "{} at {} did not stop within {bound:?}",
                self.name, self.addr
            )),
        }
    }
}

/// A running generator: its server and its service (for [`GeneratorService::stats`]).
#[derive(Debug)]
pub struct Generator {
    pub server: Server,
    pub service: GeneratorService,
}

/// The loaded demo model, tokenizer and vision tower, shared by every server of the suite.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The demo decoder serving text.
    pub text_model: Arc<Gemma3>,
    /// The same decoder taking image embeddings.
    pub multimodal_model: Arc<Gemma3>,
    /// The Gemma 3 tokenizer (the generators' stop ids and detokenization).
    pub tokenizer: Arc<Tokenizer>,
    /// The tokenizer service's state.
    pub tokenizer_service: medgemma_tokenizer_service::TokenizerService,
    /// The vision service's state (the random demo tower).
    pub vision_service: medgemma_vision_service::VisionService,
    /// The model id the generators report.
    pub model_id: String,
}

/// Loads the demo assets under `cache` (blocking: run it off the async runtime).
pub fn load_demo(cache: &Path, fetch: bool) -> Result<Loaded, SuiteError> {
    let paths = if fetch {
        medgemma_assets::fetch_demo(&medgemma_assets::FetchOptions {
            cache_dir: Some(cache.to_owned()),
            progress: true,
            verify_existing: false,
        })?
    } else {
        medgemma_assets::DemoPaths::under(cache)
    };
    let tokenizer = Arc::new(Tokenizer::from_path(&paths.tokenizer_dir)?);
    let opts = LoadOptions {
        cache_dir: Some(medgemma_assets::quantization_cache_dir(cache)),
        ..LoadOptions::default()
    };
    let text_model = Arc::new(Gemma3::load(&paths.gguf, &opts)?);
    let (multimodal_model, vision_service) = demo_vision(&paths.gguf, &opts)?;
    let tokens_per_image = vision_service.tokens_per_image();
    let encoder =
        medgemma_tokenizer::PromptEncoder::new(tokenizer.clone(), cache, tokens_per_image)?;
    let tokenizer_service =
        medgemma_tokenizer_service::TokenizerService::new(encoder, tokens_per_image);
    Ok(Loaded {
        text_model,
        multimodal_model,
        tokenizer,
        tokenizer_service,
        vision_service,
        model_id: medgemma_generator::model_id_for(&paths.gguf),
    })
}

/// The seed of the demo vision tower's random weights.
pub const DEMO_VISION_SEED: u64 = 0;

/// The multimodal decoder (a second copy of the demo decoder, told about the image tokens) and
/// the random demo vision tower sized to it.
fn demo_vision(
    gguf: &Path,
    opts: &LoadOptions,
) -> Result<(Arc<Gemma3>, medgemma_vision_service::VisionService), SuiteError> {
    let mut decoder = Gemma3::load(gguf, opts)?;
    let hidden = decoder.config().text.hidden_size;
    let encoder = VisionEncoder::demo(hidden, DEMO_VISION_SEED, &Device::Cpu, DType::F32)?;
    decoder.set_multimodal(encoder.config().to_model_config())?;
    let service = medgemma_vision_service::VisionService::new(
        encoder,
        medgemma_vision_service::VisionSettings::new("demo-siglip-random"),
    )?;
    Ok((Arc::new(decoder), service))
}

fn stopper() -> (
    watch::Sender<bool>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, mut rx) = watch::channel(false);
    (tx, async move {
        let _ = rx.wait_for(|s| *s).await;
    })
}

/// The running suite.
#[derive(Debug)]
pub struct Suite {
    pub tokenizer: Server,
    pub vision: Server,
    /// The text pool.
    pub text: Vec<Generator>,
    /// The multimodal pool (one generator).
    pub multimodal: Generator,
    pub gateway: Server,
    loaded: Loaded,
    options: SuiteOptions,
}

impl Suite {
    /// Loads the demo assets and starts every server; returns once all are SERVING.
    pub async fn start(options: SuiteOptions) -> Result<Self, SuiteError> {
        let cache = options
            .cache_dir
            .clone()
            .unwrap_or_else(medgemma_assets::cache_dir);
        let fetch = options.fetch;
        let loaded = tokio::task::spawn_blocking(move || load_demo(&cache, fetch)).await??;
        Self::start_with(loaded, options).await
    }

    /// Starts every server on already loaded state.
    pub async fn start_with(loaded: Loaded, options: SuiteOptions) -> Result<Self, SuiteError> {
        let any = format!("{}:0", options.host);
        let serve_opts = medgemma_rpc::ServeOptions {
            drain_timeout: options.drain_timeout,
            tls: options.tls.as_ref().map(SuiteTls::backend).transpose()?,
            ..medgemma_rpc::ServeOptions::default()
        };

        let (stop, stopped) = stopper();
        let t = medgemma_tokenizer_service::serve(
            loaded.tokenizer_service.clone(),
            &any,
            stopped,
            serve_opts.clone(),
        )
        .await?;
        let tokenizer = Server::new("tokenizer", t.local_addr, stop, t.server);

        let (stop, stopped) = stopper();
        let v = medgemma_vision_service::serve(
            loaded.vision_service.clone(),
            &any,
            stopped,
            serve_opts.clone(),
        )
        .await?;
        let vision = Server::new("vision", v.local_addr, stop, v.server);

        let mut text = Vec::new();
        for _ in 0..options.text_replicas.max(1) {
            text.push(start_generator(&loaded, false, &any, &options).await?);
        }
        let multimodal = start_generator(&loaded, true, &any, &options).await?;

        let mut args = GatewayArgs::with_pools(
            options.gateway_listen.clone(),
            vec![tokenizer.addr.to_string()],
            text.iter().map(|g| g.server.addr.to_string()).collect(),
            vec![multimodal.server.addr.to_string()],
            vec![vision.addr.to_string()],
        );
        args.disclaimer.clone_from(&options.disclaimer);
        args.drain_timeout = options.drain_timeout;
        if let Some(tls) = &options.tls {
            tls.apply(&mut args);
        }
        let gateway = start_gateway(args).await?;
        Ok(Self {
            tokenizer,
            vision,
            text,
            multimodal,
            gateway,
            loaded,
            options,
        })
    }

    /// The loaded state (to start more servers on it).
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// Starts one more generator on the suite's model (not added to any gateway's pool).
    pub async fn start_generator(&self, multimodal: bool) -> Result<Generator, SuiteError> {
        self.start_generator_with_queue(
            multimodal,
            self.options.queue_capacity,
            self.options.max_running,
        )
        .await
    }

    /// [`Suite::start_generator`] with its own queue capacity and running-sequence limit
    /// (overload tests).
    pub async fn start_generator_with_queue(
        &self,
        multimodal: bool,
        queue_capacity: usize,
        max_running: usize,
    ) -> Result<Generator, SuiteError> {
        let options = SuiteOptions {
            queue_capacity,
            max_running,
            ..self.options.clone()
        };
        start_generator(
            &self.loaded,
            multimodal,
            &format!("{}:0", options.host),
            &options,
        )
        .await
    }

    /// Stops every server within `bound` in all, the gateway first: its streams finish (up
    /// to its drain timeout) while the backends still serve them; then the backends drain in
    /// parallel. Returns what went wrong.
    pub async fn stop(self, bound: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + bound;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut errors = Vec::new();
        if let Err(e) = self.gateway.stop(left()).await {
            errors.push(e);
        }
        let mut servers: Vec<Server> = self.text.into_iter().map(|g| g.server).collect();
        servers.push(self.multimodal.server);
        servers.push(self.vision);
        servers.push(self.tokenizer);
        // Signal the backends first so they drain in parallel, then wait.
        for s in &servers {
            let _ = s.stop.send(true);
        }
        for s in servers {
            if let Err(e) = s.stop(left()).await {
                errors.push(e);
            }
        }
        errors
    }
}

/// Starts a generator on the loaded decoder (the multimodal variant takes image embeddings).
pub async fn start_generator(
    loaded: &Loaded,
    multimodal: bool,
    listen: &str,
    options: &SuiteOptions,
) -> Result<Generator, SuiteError> {
    let mut config = GeneratorConfig::new(if multimodal {
        format!("{}+demo-vision", loaded.model_id)
    } else {
        loaded.model_id.clone()
    });
    config.drain_timeout = options.drain_timeout;
    config.queue_capacity = options.queue_capacity;
    config.scheduler.max_running = options.max_running;
    config.tls = options.tls.as_ref().map(SuiteTls::backend).transpose()?;
    config.validate()?;
    let (stop, stopped) = stopper();
    let running: RunningGenerator = medgemma_generator::serve(config, listen, stopped).await?;
    let model = if multimodal {
        loaded.multimodal_model.clone()
    } else {
        loaded.text_model.clone()
    };
    running.start(model, loaded.tokenizer.clone()).await?;
    Ok(Generator {
        server: Server::new("generator", running.local_addr, stop, running.server),
        service: running.service,
    })
}

/// Binds and serves a gateway.
pub async fn start_gateway(args: GatewayArgs) -> Result<Server, SuiteError> {
    let (stop, stopped) = stopper();
    let gw = GatewayServer::bind(args).await?;
    let addr = gw.local_addr();
    let task = tokio::spawn(gw.serve(stopped));
    Ok(Server::new("gateway", addr, stop, task))
}
