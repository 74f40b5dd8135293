//! Telemetry plumbing with the OpenTelemetry layer installed, as the binaries install it: W3C
//! `traceparent` and `baggage` go from an incoming call to an outgoing one through
//! [`RpcLayer`], and the panic hook logs location and thread but never the payload, and counts.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use medgemma_rpc::RpcLayer;
use medgemma_rpc::trace::TraceContext;
use opentelemetry::trace::TracerProvider as _;
use tonic::body::Body;
use tower::ServiceExt;
use tower_layer::Layer;
use tracing_subscriber::layer::SubscriberExt;

const CANARY: &str = "ZQXCANARY-panic-payload";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One global subscriber for the test binary: the OpenTelemetry layer (ids and sampling, no
/// exporter) and JSON logs into a buffer.
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let tracer = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .build()
            .tracer("test");
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::set_global_default(subscriber).unwrap();
        captured
    })
}

#[tokio::test]
async fn traceparent_and_baggage_cross_the_hop() {
    logs();
    let seen = Arc::new(Mutex::new(None));
    let out = seen.clone();
    let svc = RpcLayer.layer(tower::service_fn(move |req: http::Request<()>| {
        let out = out.clone();
        async move {
            // What a handler does on an outgoing call.
            let ctx = *req.extensions().get::<TraceContext>().unwrap();
            let mut outgoing = tonic::Request::new(());
            medgemma_rpc::trace::inject(&ctx, outgoing.metadata_mut());
            *out.lock().unwrap() = Some((ctx, outgoing.metadata().clone()));
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        }
    }));
    let request = http::Request::builder()
        .uri("/medgemma.generation.v1.Generator/GenerateStream")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("baggage", "tenant=ward-7,region=tw")
        .body(())
        .unwrap();
    svc.oneshot(request).await.unwrap();
    let (ctx, md) = seen.lock().unwrap().take().unwrap();
    assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        ctx.span_id(),
        "00f067aa0ba902b7",
        "this hop has its own span"
    );
    let out = medgemma_rpc::trace::extract(&md).expect("a traceparent goes out");
    assert_eq!(out.trace_id(), ctx.trace_id());
    assert_eq!(
        out.span_id(),
        ctx.span_id(),
        "the outgoing parent is this hop's span"
    );
    let baggage = md
        .get("baggage")
        .expect("baggage goes out")
        .to_str()
        .unwrap();
    let mut items: Vec<&str> = baggage.split(',').map(str::trim).collect();
    items.sort_unstable();
    assert_eq!(items, ["region=tw", "tenant=ward-7"]);
}

#[test]
fn the_panic_hook_logs_location_and_thread_never_the_payload_and_counts() {
    let logs = logs();
    medgemma_rpc::telemetry::install_panic_hook();
    let before = medgemma_rpc::metrics::metrics().panics.get();
    let joined = std::thread::Builder::new()
        .name("panicky-worker".into())
        .spawn(|| panic!("request text: {CANARY}"))
        .unwrap()
        .join();
    assert!(joined.is_err());
    assert_eq!(medgemma_rpc::metrics::metrics().panics.get(), before + 1);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("payload withheld"))
        .expect("the panic is logged");
    assert!(line.contains("panicky-worker"), "{line}");
    assert!(line.contains("tests/telemetry.rs:"), "{line}");
    assert!(!text.contains(CANARY), "the payload leaked: {text}");
    let metrics = medgemma_rpc::metrics::metrics().render();
    assert!(metrics.contains("medgemma:panics_total "));
}
