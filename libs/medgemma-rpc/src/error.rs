//! The crate's one error type.

use std::net::SocketAddr;

/// What can fail while binding or serving.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The listen address could not be resolved or bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("cannot read the bound address: {0}")]
    LocalAddr(std::io::Error),
    /// The reflection service rejected a descriptor set.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Draining in-flight calls took longer than the bound; the remaining connections were
    /// closed.
    #[error("drain on {addr} did not finish within {secs} s; connections were closed")]
    DrainTimeout {
        /// The server's address.
        addr: SocketAddr,
        /// The bound, in seconds.
        secs: u64,
    },
}
