//! Prometheus metrics of every medgemma process, and the text endpoint (`--metrics-addr`).
//!
//! Names follow vLLM's (`vllm:` becomes `medgemma:`), so dashboards, KEDA triggers and the
//! Gateway API Inference Extension's queue and KV-cache gauges map onto them. Labels are closed
//! sets (service, method, task, gRPC code, engine, finish reason, outcome): never a request id,
//! never anything derived from request content.
//!
//! One registry per process ([`metrics`]); `medgemma up` serves all four services' metrics
//! from one endpoint, told apart by the `service` and `engine` labels.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Requests by service, method, task and gRPC status code (counter).
pub const REQUESTS_TOTAL: &str = "medgemma:requests_total";
/// Time from a call's arrival to its last response byte, by service, method and task (seconds).
pub const E2E_REQUEST_LATENCY: &str = "medgemma:e2e_request_latency_seconds";
/// Time from a generation request's arrival to its first token (seconds).
pub const TIME_TO_FIRST_TOKEN: &str = "medgemma:time_to_first_token_seconds";
/// Time between consecutive tokens of one sequence (seconds).
pub const INTER_TOKEN_LATENCY: &str = "medgemma:inter_token_latency_seconds";
/// Time a request waited before its first step ran (generator) or its batch started (vision).
pub const REQUEST_QUEUE_TIME: &str = "medgemma:request_queue_time_seconds";
/// Requests waiting to be scheduled (gauge; vLLM's autoscaling signal).
pub const NUM_REQUESTS_WAITING: &str = "medgemma:num_requests_waiting";
/// Sequences in the running batch (gauge).
pub const NUM_REQUESTS_RUNNING: &str = "medgemma:num_requests_running";
/// Share of the KV-cache byte limit in use, 0 to 1 (gauge; 0 when the cache has no limit).
pub const KV_CACHE_USAGE_PERC: &str = "medgemma:kv_cache_usage_perc";
/// Prompt tokens looked up in the prefix cache (counter).
pub const PREFIX_CACHE_QUERIES: &str = "medgemma:prefix_cache_queries_total";
/// Prompt tokens found in the prefix cache (counter).
pub const PREFIX_CACHE_HITS: &str = "medgemma:prefix_cache_hits_total";
/// Prompt tokens of finished requests (counter).
pub const PROMPT_TOKENS: &str = "medgemma:prompt_tokens_total";
/// Generated tokens of finished requests (counter).
pub const GENERATION_TOKENS: &str = "medgemma:generation_tokens_total";
/// Finished generation requests by finish reason (counter).
pub const REQUEST_SUCCESS: &str = "medgemma:request_success_total";
/// Wall time of one vision encoder batch (decode, preprocess, tower, projector; seconds).
pub const VISION_ENCODE_TIME: &str = "medgemma:vision_encode_seconds";
/// Images the vision service handled, by outcome (`encoded`, `cached`, `failed`).
pub const VISION_IMAGES: &str = "medgemma:vision_images_total";
/// Resident set size of the process (bytes), read at each scrape.
pub const PROCESS_RSS: &str = "medgemma:process_resident_memory_bytes";
/// Panics caught by the panic hook, in any thread (counter).
pub const PANICS_TOTAL: &str = "medgemma:panics_total";

/// The documented metric families, each with its type and unit, as the README's table lists
/// them (the tests check every one is exported).
pub const DOCUMENTED: &[&str] = &[
    REQUESTS_TOTAL,
    E2E_REQUEST_LATENCY,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    REQUEST_QUEUE_TIME,
    NUM_REQUESTS_WAITING,
    NUM_REQUESTS_RUNNING,
    KV_CACHE_USAGE_PERC,
    PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUEST_SUCCESS,
    VISION_ENCODE_TIME,
    VISION_IMAGES,
    PROCESS_RSS,
    PANICS_TOTAL,
];

/// Latency buckets (seconds) for requests, TTFT and queue waits: 1 ms to 10 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
];
/// Inter-token latency buckets (seconds), vLLM's.
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// Every metric of the process. Handles are cheap to clone; label values come from closed sets.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `service`, `method`, `task`, `code`.
    pub requests: IntCounterVec,
    /// `service`, `method`, `task`.
    pub e2e_latency: HistogramVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub ttft: HistogramVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub itl: HistogramVec,
    /// `service`, `model_name`, `engine`.
    pub queue_time: HistogramVec,
    /// `service`, `model_name`, `engine`.
    pub waiting: IntGaugeVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub running: IntGaugeVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub kv_usage: prometheus::GaugeVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub prefix_queries: IntCounterVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub prefix_hits: IntCounterVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub prompt_tokens: IntCounterVec,
    /// `model_name`, `engine` (vLLM's labels: the model id, and the engine index in this process).
    pub generation_tokens: IntCounterVec,
    /// `model_name`, `engine`, `finished_reason`.
    pub request_success: IntCounterVec,
    /// Vision batch wall time.
    pub vision_encode: Histogram,
    /// `outcome`.
    pub vision_images: IntCounterVec,
    /// Process RSS, refreshed at each scrape.
    pub rss: IntGauge,
    /// Panics.
    pub panics: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let kv_usage = prometheus::GaugeVec::new(
            Opts::new(
                KV_CACHE_USAGE_PERC,
                "KV-cache usage, 0 to 1 of the byte limit",
            ),
            &["model_name", "engine"],
        )
        .expect("valid metric");
        r.register(Box::new(kv_usage.clone()))
            .expect("registered once");
        let vision_encode = Histogram::with_opts(
            HistogramOpts::new(
                VISION_ENCODE_TIME,
                "Vision encoder batch wall time, seconds",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        r.register(Box::new(vision_encode.clone()))
            .expect("registered once");
        let rss = IntGauge::new(PROCESS_RSS, "Resident set size, bytes").expect("valid metric");
        r.register(Box::new(rss.clone())).expect("registered once");
        let panics =
            IntCounter::new(PANICS_TOTAL, "Panics caught by the panic hook").expect("valid metric");
        r.register(Box::new(panics.clone()))
            .expect("registered once");
        Self {
            requests: counter(
                &r,
                REQUESTS_TOTAL,
                "gRPC requests by service, method, task and status code",
                &["service", "method", "task", "code"],
            ),
            e2e_latency: histogram(
                &r,
                E2E_REQUEST_LATENCY,
                "Arrival to last response byte, seconds",
                &["service", "method", "task"],
                LATENCY_BUCKETS,
            ),
            ttft: histogram(
                &r,
                TIME_TO_FIRST_TOKEN,
                "Arrival to first generated token, seconds",
                &["model_name", "engine"],
                LATENCY_BUCKETS,
            ),
            itl: histogram(
                &r,
                INTER_TOKEN_LATENCY,
                "Time between consecutive tokens of a sequence, seconds",
                &["model_name", "engine"],
                ITL_BUCKETS,
            ),
            queue_time: histogram(
                &r,
                REQUEST_QUEUE_TIME,
                "Time waiting before the first step or batch, seconds",
                &["service", "model_name", "engine"],
                LATENCY_BUCKETS,
            ),
            waiting: gauge(
                &r,
                NUM_REQUESTS_WAITING,
                "Requests waiting to be scheduled",
                &["service", "model_name", "engine"],
            ),
            running: gauge(
                &r,
                NUM_REQUESTS_RUNNING,
                "Sequences in the running batch",
                &["model_name", "engine"],
            ),
            kv_usage,
            prefix_queries: counter(
                &r,
                PREFIX_CACHE_QUERIES,
                "Prompt tokens looked up in the prefix cache",
                &["model_name", "engine"],
            ),
            prefix_hits: counter(
                &r,
                PREFIX_CACHE_HITS,
                "Prompt tokens found in the prefix cache",
                &["model_name", "engine"],
            ),
            prompt_tokens: counter(
                &r,
                PROMPT_TOKENS,
                "Prompt tokens of finished requests",
                &["model_name", "engine"],
            ),
            generation_tokens: counter(
                &r,
                GENERATION_TOKENS,
                "Generated tokens of finished requests",
                &["model_name", "engine"],
            ),
            request_success: counter(
                &r,
                REQUEST_SUCCESS,
                "Finished generation requests by finish reason",
                &["model_name", "engine", "finished_reason"],
            ),
            vision_encode,
            vision_images: counter(
                &r,
                VISION_IMAGES,
                "Images handled by the vision service, by outcome",
                &["outcome"],
            ),
            rss,
            panics,
            registry: r,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric, RSS refreshed.
    pub fn render(&self) -> String {
        if let Some(rss) = resident_bytes() {
            self.rss.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Resident set size from `/proc/self/statm` (Linux), in bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The most bytes of an HTTP request head the endpoint reads.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scrape may take to send its request.
const SCRAPE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves `GET /metrics` (Prometheus text) on it in a background task until the
/// runtime stops. Returns the bound address (`127.0.0.1:0` picks a free port).
pub async fn serve_metrics(addr: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = answer_scrape(&mut socket).await;
            });
        }
    });
    Ok(local)
}

/// One HTTP/1.x exchange: reads the request head (bounded in size and time), answers, closes.
async fn answer_scrape(socket: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(SCRAPE_READ_TIMEOUT, read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method != "GET" && method != "HEAD" {
        ("405 Method Not Allowed", "text/plain", String::new())
    } else if path == "/metrics" || path == "/" {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics().render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        )
    };
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_family_is_registered() {
        let m = metrics();
        // Touch one child of each labelled family so it appears in the text.
        m.requests.with_label_values(&["s", "m", "t", "OK"]).inc();
        let text = m.render();
        assert!(text.contains("# TYPE medgemma:requests_total counter"));
        assert!(text.contains("medgemma:process_resident_memory_bytes "));
        assert!(text.contains("# TYPE medgemma:panics_total counter"));
    }

    #[tokio::test]
    async fn the_endpoint_answers_scrapes() {
        let addr = serve_metrics("127.0.0.1:0").await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("medgemma:process_resident_memory_bytes"));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    }
}
