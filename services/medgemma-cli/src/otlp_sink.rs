//! `medgemma bench-serve --otlp-sink`: an OTLP/gRPC trace receiver inside the benchmark's
//! process, so the suite exports its spans as it would to a collector and the cost of export
//! can be measured against a run without it. It counts what arrives and keeps nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// The receiver's counts.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    spans: Arc<AtomicU64>,
    exports: Arc<AtomicU64>,
}

impl Counts {
    /// Spans received so far, and the export calls that carried them.
    pub fn get(&self) -> (u64, u64) {
        (
            self.spans.load(Ordering::Relaxed),
            self.exports.load(Ordering::Relaxed),
        )
    }
}

#[tonic::async_trait]
impl TraceService for Counts {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.exports.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A bound listener whose address the exporter is pointed at.
pub struct Sink {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

/// Binds 127.0.0.1:0 and sets `OTEL_EXPORTER_OTLP_ENDPOINT` to it. Call while the process has
/// one thread (before the runtime and the model load): it changes the environment.
#[allow(unsafe_code)]
pub fn bind() -> anyhow::Result<Sink> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    // SAFETY: called from `bench-serve`'s `run` before any other thread exists.
    unsafe { std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")) };
    Ok(Sink { listener, addr })
}

impl Sink {
    /// Serves the receiver on the current runtime; returns its counts.
    pub fn serve(self) -> anyhow::Result<Counts> {
        let counts = Counts::default();
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        tracing::info!(addr = %self.addr, "OTLP sink listening");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(counts.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(counts)
    }
}
