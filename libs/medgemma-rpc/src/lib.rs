//! Shared gRPC plumbing for the medgemma services. No model code.
//!
//! - [`RpcServer`]: bind (port 0 friendly, the bound address is known before serving), then
//!   [`serve`](RpcServer::serve) the caller's routes beside `grpc.health.v1` and server
//!   reflection v1 and v1alpha, every RPC wrapped in [`RpcLayer`]. Health starts NOT_SERVING;
//!   the caller flips it with [`Health::set_serving`] once loaded and warmed. The shutdown
//!   future (e.g. [`shutdown_signal`]: SIGTERM or SIGINT) flips health to NOT_SERVING, stops
//!   accepting, and drains in-flight calls for at most [`ServeOptions::drain_timeout`].
//! - [`with_limits!`]: raises a generated server's (or client's) message limits to
//!   [`MAX_MESSAGE_BYTES`]; image embeddings are megabytes.
//! - [`trace`]: W3C `traceparent` in gRPC metadata; [`RpcLayer`] opens one span per RPC with
//!   the method and trace id only, never request content.
//! - [`deadline`]: the remaining `grpc-timeout` of a request; [`RpcLayer`] answers
//!   DEADLINE_EXCEEDED when it expires before the response starts.
//! - [`bad_request`]: INVALID_ARGUMENT with `google.rpc.BadRequest` field violations.
//! - [`client`]: a channel with our settings, health checks, reflection listings.
//! - [`worker`]: the model on its own thread behind a bounded queue, every unit of work under
//!   a panic guard, and the health watchdog (NOT_SERVING when the thread died or is wedged,
//!   exit after a grace period).
//! - [`telemetry`]: the one telemetry set-up of every service binary ([`CommonArgs`]: logs as
//!   JSON lines or human-readable, OTLP trace export from the standard `OTEL_*` variables, the
//!   panic hook, `--metrics-addr`); [`init_logging`] for the CLI's one-shot commands.
//! - [`metrics`]: the Prometheus metrics (vLLM-style names) and their text endpoint.
//! - [`tls`]: TLS and mTLS (rustls) for servers and clients, certificates re-read when
//!   their files change; [`tls::DevCa`], a throwaway CA for `medgemma up --tls` and tests.

pub mod client;
pub mod deadline;
mod error;
mod layer;
pub mod metrics;
mod server;
mod status;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod worker;

pub use error::RpcError;

/// Logs to stderr (stdout is for results), filtered by `MEDGEMMA_LOG` (`tracing` filter
/// syntax, e.g. `info,medgemma_rpc=debug`), else at `default_level`. Every binary calls this
/// once at start.
pub fn init_logging(default_level: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEDGEMMA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
}

/// Sets `RAYON_NUM_THREADS` to the available parallelism unless it is set: candle asks for the
/// thread count on every parallel CPU op and, without it, re-reads /proc/cpuinfo each time
/// (~5% of a decode step). Every binary that holds a model calls it first thing in `main`,
/// before any other thread exists (so before a tokio runtime is built).
#[allow(unsafe_code)]
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // SAFETY: the caller runs this at the top of main, while the process has one thread.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

/// The `main` of a server binary that holds a model: [`pin_thread_count`], then a
/// multi-threaded tokio runtime that runs `main` to completion.
pub fn run_pinned<T>(main: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    pin_thread_count();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(main))
}

pub use layer::{RpcLayer, RpcService, TASK_HEADER, TASKS, Task, code_name, task};
pub use server::{Health, RpcServer, Running, ServeOptions, shutdown_signal};
pub use status::{
    FieldViolation, bad_request, bad_request_violations, field_violations, is_overloaded,
    overloaded,
};
pub use telemetry::{CommonArgs, LogFormat, Telemetry};

/// The largest gRPC message a medgemma server or client sends or accepts (64 MiB): one image's
/// embeddings for the 4B model are 1.3 MB in bf16, tonic's default limit is 4 MB.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Raises the decoding and encoding limits of a generated tonic server or client to
/// [`MAX_MESSAGE_BYTES`]:
///
/// ```ignore
/// let svc = medgemma_rpc::with_limits!(GeneratorServer::new(generator));
/// ```
#[macro_export]
macro_rules! with_limits {
    ($svc:expr) => {
        $svc.max_decoding_message_size($crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size($crate::MAX_MESSAGE_BYTES)
    };
}
