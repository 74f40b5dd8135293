//! Telemetry set-up of every medgemma process: logs (JSON lines or human-readable), OpenTelemetry
//! traces exported over OTLP/gRPC, the panic hook, the Prometheus endpoint, and the flags that
//! configure them ([`CommonArgs`], flattened into every binary's arguments).
//!
//! Traces are configured only by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (none set: no exporter, no error), `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` and the
//! `OTEL_BSP_*` batch settings. W3C `traceparent` and `baggage` are extracted by
//! [`RpcLayer`](crate::RpcLayer) and injected by [`trace::inject`](crate::trace::inject).
//!
//! Spans are routed to a `service.name` by their tracing target (`medgemma_generator::...` is
//! the generator), or by the `medgemma.service` attribute of the per-RPC span: `medgemma up`
//! runs four services in one process and each exports under its own name, as in a cluster.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, with the trace and span ids of the spans it happened in.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Flags every medgemma service binary takes (flattened into its arguments, and into `medgemma
/// up`'s). Each also reads a `MEDGEMMA_*` variable. Tracing itself is configured by the
/// standard `OTEL_*` variables only.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Serve Prometheus metrics (text format) on `host:port` at `/metrics`; off when unset.
    #[arg(long, env = "MEDGEMMA_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Log line format: `json` (with trace and span ids) or `pretty`. Default: pretty when
    /// stderr is a terminal, json otherwise.
    #[arg(long, env = "MEDGEMMA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Also log request and response content (prompts, notes, options, answers) at debug
    /// level. That is patient data: for debugging on synthetic data only (warned at start-up).
    #[arg(long, env = "MEDGEMMA_LOG_CONTENT")]
    pub log_content: bool,
}

/// The `service.name` of each service, and the tracing target prefix its spans carry.
pub const SUITE_SERVICES: &[(&str, &str)] = &[
    ("medgemma_gateway", GATEWAY),
    ("medgemma_tokenizer_service", TOKENIZER),
    ("medgemma_vision_service", VISION),
    ("medgemma_vision", VISION),
    ("medgemma_generator", GENERATOR),
    ("medgemma_engine", GENERATOR),
];
/// `service.name` of the gateway.
pub const GATEWAY: &str = "medgemma-gateway";
/// `service.name` of the tokenizer service.
pub const TOKENIZER: &str = "medgemma-tokenizer";
/// `service.name` of the vision service.
pub const VISION: &str = "medgemma-vision";
/// `service.name` of the generator.
pub const GENERATOR: &str = "medgemma-generator";

/// `gen_ai.provider.name` of every GenAI span: the model is served here, by us.
pub const PROVIDER: &str = "medgemma-serve";

/// The span attribute that names the service of a per-RPC span.
pub const SERVICE_ATTRIBUTE: &str = "medgemma.service";

static LOG_CONTENT: AtomicBool = AtomicBool::new(false);

static TRACER: std::sync::OnceLock<opentelemetry_sdk::trace::Tracer> = std::sync::OnceLock::new();

/// Records a finished phase of `parent`'s work as a child span with its real start and end
/// (the model thread learns a sequence's queue, prefill and decode times only when it ends,
/// and holds no span per token). `service` is the `service.name` it is exported under; the
/// attributes must hold no request content. Does nothing before [`init`].
pub fn record_span(
    parent: &tracing::Span,
    name: &'static str,
    service: &'static str,
    start: std::time::SystemTime,
    end: std::time::SystemTime,
    attributes: Vec<KeyValue>,
) -> Option<opentelemetry::Context> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    record_span_in(&parent.context(), name, service, start, end, attributes)
}

/// [`record_span`] under an OpenTelemetry context (the one an earlier [`record_span`]
/// returned, to nest phases: a prefill's chunks). Returns the new span's context.
pub fn record_span_in(
    cx: &opentelemetry::Context,
    name: &'static str,
    service: &'static str,
    start: std::time::SystemTime,
    end: std::time::SystemTime,
    mut attributes: Vec<KeyValue>,
) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _};
    let tracer = TRACER.get()?;
    if !cx.span().span_context().is_valid() {
        return None;
    }
    attributes.push(KeyValue::new(SERVICE_ATTRIBUTE, service));
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, cx);
    let recorded = span.span_context().clone();
    span.end_with_timestamp(end);
    Some(opentelemetry::Context::new().with_remote_span_context(recorded))
}

/// Whether `--log-content` is on: only then may request or response content be logged (at
/// debug level).
pub fn log_content() -> bool {
    LOG_CONTENT.load(Ordering::Relaxed)
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a malformed endpoint).
    #[error("OTLP trace exporter: {0}")]
    Exporter(String),
    /// `--metrics-addr` could not be bound.
    #[error("--metrics-addr {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: String,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// What [`init`] started; [`shutdown`](Self::shutdown) flushes the trace exporter (call it
/// when the server has drained, before exiting).
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The bound metrics address, when `--metrics-addr` is set.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Telemetry {
    /// Exports every span still buffered (bounded by the exporter's timeout) and stops.
    pub fn shutdown(mut self) {
        let Some(p) = self.provider.take() else {
            return;
        };
        // The exporter's thread needs the runtime's I/O while this one waits for it.
        let flush = move || match p.shutdown_with_timeout(Duration::from_secs(5)) {
            Ok(()) => tracing::debug!("trace exporter flushed"),
            Err(e) => eprintln!("medgemma: flushing traces failed: {e}"),
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(flush),
            _ => flush(),
        }
    }
}

fn otlp_endpoint_set() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The process resource: `OTEL_SERVICE_NAME` or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`
/// when given, else `default_service`.
fn resource(default_service: &str) -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let b = Resource::builder();
    if named {
        b.build()
    } else {
        b.with_service_name(default_service.to_owned()).build()
    }
}

/// Starts telemetry for a process whose spans belong to `service` (its default `service.name`):
/// logs to stderr filtered by `MEDGEMMA_LOG` (else `default_level`), the OTLP exporter when an
/// endpoint variable is set, the panic hook, and the metrics endpoint. Call once, inside the
/// tokio runtime.
pub async fn init(
    service: &'static str,
    default_level: &str,
    args: &CommonArgs,
) -> Result<Telemetry, TelemetryError> {
    init_with_routes(service, &[], default_level, args).await
}

/// [`init`] for `medgemma up`: the four services in one process, each exporting spans under its
/// own `service.name` ([`SUITE_SERVICES`]); the rest under `service`.
pub async fn init_suite(
    service: &'static str,
    default_level: &str,
    args: &CommonArgs,
) -> Result<Telemetry, TelemetryError> {
    init_with_routes(service, SUITE_SERVICES, default_level, args).await
}

async fn init_with_routes(
    service: &'static str,
    routes: &[(&'static str, &'static str)],
    default_level: &str,
    args: &CommonArgs,
) -> Result<Telemetry, TelemetryError> {
    LOG_CONTENT.store(args.log_content, Ordering::Relaxed);
    let provider = if otlp_endpoint_set() {
        let exporter = RoutingExporter::new(service, routes)?;
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource(service))
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };
    // Without an exporter the spans still carry W3C context from hop to hop: a provider with
    // no processor keeps ids and sampling and records nothing.
    let tracer = provider
        .clone()
        .unwrap_or_else(|| SdkTracerProvider::builder().build())
        .tracer("medgemma");
    let _ = TRACER.set(tracer.clone());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target("medgemma", LevelFilter::INFO));
    let filter =
        EnvFilter::try_from_env("MEDGEMMA_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let format = args
        .log_format
        .unwrap_or(if std::io::stderr().is_terminal() {
            LogFormat::Pretty
        } else {
            LogFormat::Json
        });
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
    };
    // A second init in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    install_panic_hook();
    if args.log_content {
        tracing::warn!(
            service,
            "--log-content is on: prompts, notes, options and answers are logged; this is \
             patient data, never enable it in production"
        );
    }
    let metrics_addr = match &args.metrics_addr {
        Some(addr) => {
            let bound = crate::metrics::serve_metrics(addr)
                .await
                .map_err(|source| TelemetryError::Metrics {
                    addr: addr.clone(),
                    source,
                })?;
            tracing::info!(service, addr = %bound, "metrics at http://{bound}/metrics");
            Some(bound)
        }
        None => None,
    };
    tracing::info!(
        service,
        otlp_export = provider.is_some(),
        log_format = ?format,
        "telemetry ready"
    );
    Ok(Telemetry {
        provider,
        metrics_addr,
    })
}

/// Logs every panic with its location and thread only, never its payload (a payload may quote
/// request text), and counts it in `medgemma:panics_total`. Replaces the default hook, which
/// prints the payload.
pub fn install_panic_hook() {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        crate::metrics::metrics().panics.inc();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown".into());
        tracing::error!(
            panic.location = %location,
            panic.thread = thread,
            "panic (payload withheld: it may hold request content)"
        );
    }));
}

/// Sends each span to the OTLP exporter of its service: by the `medgemma.service` attribute,
/// else by the longest matching tracing-target prefix, else the process default.
#[derive(Debug)]
struct RoutingExporter {
    /// `(service.name, exporter)`; the first is the default.
    exporters: Vec<(&'static str, opentelemetry_otlp::SpanExporter)>,
    routes: Vec<(&'static str, usize)>,
}

impl RoutingExporter {
    fn new(
        default: &'static str,
        routes: &[(&'static str, &'static str)],
    ) -> Result<Self, TelemetryError> {
        let build = || {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))
        };
        let mut exporters = vec![(default, build()?)];
        let mut table = Vec::new();
        for &(prefix, name) in routes {
            let idx = match exporters.iter().position(|(n, _)| *n == name) {
                Some(i) => i,
                None => {
                    exporters.push((name, build()?));
                    exporters.len() - 1
                }
            };
            table.push((prefix, idx));
        }
        // Longest prefix first (`medgemma_vision_service` before `medgemma_vision`).
        table.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Self {
            exporters,
            routes: table,
        })
    }

    fn route(&self, span: &SpanData) -> usize {
        let service = Key::from_static_str(SERVICE_ATTRIBUTE);
        let target = Key::from_static_str("target");
        let mut by_target = None;
        for kv in &span.attributes {
            if kv.key == service {
                let v = kv.value.as_str();
                if let Some(i) = self.exporters.iter().position(|(n, _)| *n == v) {
                    return i;
                }
            } else if kv.key == target {
                let t = kv.value.as_str();
                by_target = self
                    .routes
                    .iter()
                    .find(|(p, _)| t.starts_with(p))
                    .map(|&(_, i)| i);
            }
        }
        by_target.unwrap_or(0)
    }
}

impl SpanExporter for RoutingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if self.exporters.len() == 1 {
            return self.exporters[0].1.export(batch).await;
        }
        let mut groups: Vec<Vec<SpanData>> = vec![Vec::new(); self.exporters.len()];
        for span in batch {
            let i = self.route(&span);
            groups[i].push(span);
        }
        let mut result = Ok(());
        for (group, (_, exporter)) in groups.into_iter().zip(&self.exporters) {
            if !group.is_empty()
                && let Err(e) = exporter.export(group).await
            {
                result = Err(e);
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let mut result = Ok(());
        for (_, e) in &self.exporters {
            if let Err(err) = e.shutdown_with_timeout(timeout) {
                result = Err(err);
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        for (_, e) in &self.exporters {
            e.force_flush()?;
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        let default_named = resource.get(&Key::from_static_str("service.name"));
        for (i, (name, e)) in self.exporters.iter_mut().enumerate() {
            let mut b = Resource::builder_empty().with_attributes(
                resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            );
            // The process default keeps what OTEL_SERVICE_NAME said; the other services of
            // `medgemma up` are named for themselves.
            if i > 0 || default_named.is_none() {
                b = b.with_service_name(Value::from(*name));
            }
            e.set_resource(&b.build());
        }
    }
}
