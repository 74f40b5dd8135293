//! Binding, serving, health, reflection and graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};
use tower_layer::Layer;

use crate::error::RpcError;
use crate::layer::RpcLayer;
use crate::tls::ServerTls;
use crate::worker::{Pulse, WatchdogOptions};

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// After the drain timeout, how long handlers get to send their UNAVAILABLE before the
/// connections close.
const DRAIN_EXPIRED_GRACE: Duration = Duration::from_secs(1);

/// How a server behaves on the wire and at shutdown.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long in-flight calls may run after shutdown starts before their connections are
    /// closed.
    pub drain_timeout: Duration,
    /// HTTP/2 keep-alive ping interval (dead peers are noticed and their calls cancelled).
    pub http2_keepalive_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Streams (calls) one HTTP/2 connection may have open at once; more are refused by the
    /// HTTP/2 layer (the client queues them).
    pub max_concurrent_streams: u32,
    /// Connections served at once; further ones wait in the listen backlog until one ends.
    pub max_connections: usize,
    /// How the model worker's health is judged ([`crate::worker::watchdog`]).
    pub watchdog: WatchdogOptions,
    /// TLS (and mTLS when it has a client CA); `None`: plaintext HTTP/2.
    pub tls: Option<ServerTls>,
    /// Whether server reflection is served (off for production gateways).
    pub reflection: bool,
    /// A second, plaintext listener serving only `grpc.health.v1` (Kubernetes gRPC probes
    /// speak no TLS); `None`: none.
    pub health_listen: Option<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 256,
            max_connections: 1024,
            watchdog: WatchdogOptions::default(),
            tls: None,
            reflection: true,
            health_listen: None,
        }
    }
}

/// The health of one server's services (`grpc.health.v1`). Starts NOT_SERVING; clone freely.
#[derive(Debug, Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Arc<[String]>,
    /// Set once the server stops accepting: its workers may then end without being broken.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Health {
    async fn new(services: &[&str]) -> Self {
        let health = Self {
            reporter: HealthReporter::new(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            stopping: Arc::default(),
        };
        health.set_all(ServingStatus::NotServing).await;
        health
    }

    async fn set_all(&self, status: ServingStatus) {
        // "" is the whole server.
        self.reporter.set_service_status("", status).await;
        for name in self.services.iter() {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Reports SERVING for the server and each of its services: call once loaded and warmed.
    pub async fn set_serving(&self) {
        self.set_all(ServingStatus::Serving).await;
        tracing::info!(services = ?self.services, "health: serving");
    }

    /// Reports NOT_SERVING (shutting down, or lost a dependency).
    pub async fn set_not_serving(&self) {
        self.set_all(ServingStatus::NotServing).await;
        tracing::info!(services = ?self.services, "health: not serving");
    }

    /// Whether the server has begun its shutdown (the drain): a worker that ends from then on
    /// is shutting down with it, not dead.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The underlying reporter, for per-service statuses.
    pub fn reporter(&self) -> &HealthReporter {
        &self.reporter
    }
}

/// A server serving on its own task ([`RpcServer::spawn`]).
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub local_addr: SocketAddr,
    /// Its health: NOT_SERVING until the owner flips it.
    pub health: Health,
    /// The server task; it ends after the shutdown future completes and calls drained.
    pub server: tokio::task::JoinHandle<Result<(), RpcError>>,
}

impl Running {
    /// Watches a model worker's `pulse` with `options` on a new task: health NOT_SERVING while
    /// the worker is dead or wedged, process exit after the grace period
    /// ([`crate::worker::watchdog`]).
    pub fn watch(&self, pulse: Pulse, options: WatchdogOptions) {
        tokio::spawn(crate::worker::watchdog(self.health.clone(), pulse, options));
    }
}

/// A bound, not yet serving, gRPC server.
///
/// ```ignore
/// let server = RpcServer::bind("127.0.0.1:0", &[GeneratorServer::<G>::NAME]).await?;
/// let running = server.spawn(routes, medgemma_rpc::shutdown_signal());
/// println!("generator listening on {}", running.local_addr);
/// // ... load, warm up ...
/// running.health.set_serving().await;
/// ```
#[derive(Debug)]
pub struct RpcServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    health: Health,
    services: Vec<String>,
    options: ServeOptions,
    drain_expired: tokio::sync::watch::Sender<bool>,
    health_listener: Option<TcpListener>,
}

impl RpcServer {
    /// Binds `addr` (`127.0.0.1:0` picks a free port) for a server of `services` (their fully
    /// qualified names: what health reports and reflection lists). Health starts NOT_SERVING.
    pub async fn bind(addr: &str, services: &[&str]) -> Result<Self, RpcError> {
        Self::bind_with(addr, services, ServeOptions::default()).await
    }

    /// [`bind`](Self::bind) with options.
    pub async fn bind_with(
        addr: &str,
        services: &[&str],
        options: ServeOptions,
    ) -> Result<Self, RpcError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RpcError::Bind {
                addr: addr.to_owned(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(RpcError::LocalAddr)?;
        crate::tls::warn_if_exposed(local_addr, options.tls.as_ref());
        let health_listener = match &options.health_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| RpcError::Bind {
                        addr: addr.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            health_listener,
            listener,
            local_addr,
            health: Health::new(services).await,
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            options,
            drain_expired: tokio::sync::watch::Sender::new(false),
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Turns `true` when the drain timeout passes with calls still running: streaming handlers
    /// then end their streams with UNAVAILABLE (they get a moment before connections close).
    pub fn drain_expired(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drain_expired.subscribe()
    }

    /// The health handle: flip it to SERVING once ready.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// [`serve`](Self::serve) on a new task; the handle keeps the address and the health.
    pub fn spawn(
        self,
        routes: Routes,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Running {
        let local_addr = self.local_addr;
        let health = self.health();
        Running {
            local_addr,
            health,
            server: tokio::spawn(self.serve(routes, shutdown)),
        }
    }

    fn reflection(&self) -> tonic_reflection::server::Builder<'static> {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(medgemma_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest and friends, so grpcurl can print error details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name(REFLECTION_V1)
            .with_service_name(REFLECTION_V1ALPHA);
        for name in &self.services {
            builder = builder.with_service_name(name.clone());
        }
        builder
    }

    /// Serves `routes` (the caller's services; see [`with_limits!`](crate::with_limits)) with
    /// health and reflection v1 + v1alpha beside them, every call through [`RpcLayer`], until
    /// `shutdown` completes. Then: health NOT_SERVING, no new connections, in-flight calls
    /// drained for at most [`ServeOptions::drain_timeout`].
    pub async fn serve(
        mut self,
        routes: Routes,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), RpcError> {
        let reflection_v1 = self.reflection().build_v1()?;
        let reflection_v1alpha = self.reflection().build_v1alpha()?;
        let health_server = tonic_health::pb::health_server::HealthServer::new(
            HealthService::from_health_reporter(self.health.reporter.clone()),
        );
        let health_only = self.health_listener.take().map(|listener| {
            let routes = Routes::new(health_server.clone()).prepare();
            tokio::spawn(serve_health_only(listener, routes))
        });
        let routes = routes.add_service(health_server);
        let routes = if self.options.reflection {
            routes
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
        } else {
            routes
        }
        .prepare();
        let service = RpcLayer.layer(routes);

        let http2 = http2_builder(&self.options);
        let Self {
            listener,
            local_addr,
            health,
            options,
            drain_expired,
            ..
        } = self;
        let graceful = GracefulShutdown::new();
        let connections = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
        if let Some(tls) = &options.tls {
            tls.watch();
        }
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            // At most `max_connections` at once: the next accept waits for a slot.
            let slot = tokio::select! {
                () = &mut shutdown => break,
                slot = connections.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Small messages (stream deltas) should not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        if let Some(tls) = &options.tls {
                            // The handshake runs on the connection's own task, so a slow or
                            // hostile client never holds up accepting the next one.
                            crate::tls::serve_tls_connection(
                                tls.clone(),
                                stream,
                                peer,
                                http2.clone(),
                                service.clone(),
                                graceful.watcher(),
                            );
                            continue;
                        }
                        let connection = http2.serve_connection(
                            TokioIo::new(stream),
                            TowerToHyperService::new(service.clone()),
                        );
                        let connection = graceful.watch(connection);
                        tokio::spawn(async move {
                            if let Err(e) = connection.await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        health
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        health.set_not_serving().await;
        drop(listener);
        let _abort_health_only = health_only.map(AbortOnDrop);
        tracing::info!(addr = %local_addr, drain_s = options.drain_timeout.as_secs_f64(), "draining");
        let drained = graceful.shutdown();
        tokio::pin!(drained);
        match tokio::time::timeout(options.drain_timeout, &mut drained).await {
            Ok(()) => {
                tracing::info!(addr = %local_addr, "drained");
                Ok(())
            }
            Err(_) => {
                // Calls still running end with UNAVAILABLE (handlers that watch
                // `drain_expired`); a moment for those statuses to go out, then close.
                drain_expired.send_replace(true);
                let _ = tokio::time::timeout(DRAIN_EXPIRED_GRACE, &mut drained).await;
                Err(RpcError::DrainTimeout {
                    addr: local_addr,
                    secs: options.drain_timeout.as_secs(),
                })
            }
        }
    }
}

/// The HTTP/2 settings of every connection: keep-alive, streams per connection, header size.
fn http2_builder(options: &ServeOptions) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(options.http2_keepalive_interval))
        .keep_alive_timeout(options.http2_keepalive_timeout)
        .max_concurrent_streams(options.max_concurrent_streams)
        .adaptive_window(true)
        // gRPC metadata is small; hyper's default allows 16 MiB of headers per request.
        .max_header_list_size(64 << 10);
    http2
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves only `grpc.health.v1`, plaintext, until aborted: what Kubernetes probes reach.
async fn serve_health_only(listener: TcpListener, routes: Routes) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "health-only listener (plaintext, grpc.health.v1 only)");
    }
    let http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let connection = http2.serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(routes.clone()),
                );
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C): the shutdown future for [`RpcServer::serve`].
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}
