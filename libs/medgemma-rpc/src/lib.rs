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
//! - [`tls`]: TLS and mTLS (rustls) for servers and clients, certificates re-read when
//!   their files change; [`tls::DevCa`], a throwaway CA for `medgemma up --tls` and tests.
//! - [`init_logging`]: the one log set-up of every binary (stderr, `MEDGEMMA_LOG`).

pub mod client;
pub mod deadline;
mod error;
mod layer;
mod server;
mod status;
pub mod tls;
pub mod trace;

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
pub use layer::{RpcLayer, RpcService};
pub use server::{Health, RpcServer, Running, ServeOptions, shutdown_signal};
pub use status::{
    FieldViolation, bad_request, bad_request_violations, field_violations, is_overloaded,
    overloaded,
};

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
