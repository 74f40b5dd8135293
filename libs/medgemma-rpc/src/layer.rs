//! The tower layer every medgemma RPC passes through: one tracing span per call (method, task
//! and trace ids; never request content) whose OpenTelemetry parent is the caller's W3C
//! `traceparent` (and `baggage`), the trace context and deadline recorded in the request's
//! extensions, DEADLINE_EXCEEDED when the deadline passes before the response starts, and the
//! request counter and end-to-end latency once the response's last byte (its gRPC status) is
//! sent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant as StdInstant;

use http_body::Body as _;
use opentelemetry::propagation::TextMapPropagator as _;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::deadline::Deadline;
use crate::trace::{self, HeaderExtractor, TraceContext};

/// Wraps a gRPC router; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLayer;

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService { inner }
    }
}

/// The service [`RpcLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The metadata key a caller names its clinical task in (`ask`, `summarize`, `mcq`, `report`,
/// `deidentify`); the gateway sets it on every downstream call, so backends count by task.
pub const TASK_HEADER: &str = "medgemma-task";

/// The task names a request may carry; anything else counts as `none` (labels stay a closed
/// set whatever a caller sends).
pub const TASKS: &[&str] = &["ask", "summarize", "mcq", "report", "deidentify"];

/// The clinical task a call serves (one of [`TASKS`], or `none`), in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task(pub &'static str);

/// The task [`RpcLayer`] recorded for `request` (`none` outside the layer).
pub fn task<T>(request: &tonic::Request<T>) -> &'static str {
    request.extensions().get::<Task>().map_or("none", |t| t.0)
}

/// The task of a gateway method, or of the caller's [`TASK_HEADER`].
fn task_of(method: &str, header: Option<&str>) -> &'static str {
    let from_method = match method.trim_end_matches("Stream") {
        "Ask" => Some("ask"),
        "SummarizeClinicalNote" => Some("summarize"),
        "AnswerMultipleChoice" => Some("mcq"),
        "DraftRadiologyReport" => Some("report"),
        "Deidentify" => Some("deidentify"),
        _ => None,
    };
    from_method
        .or_else(|| header.and_then(|h| TASKS.iter().copied().find(|t| *t == h)))
        .unwrap_or("none")
}

/// Our service name for a gRPC service path (`/medgemma.generation.v1.Generator/...`).
fn service_of(grpc_service: &str) -> &'static str {
    match grpc_service.split('.').nth(1) {
        _ if !grpc_service.starts_with("medgemma.") => match grpc_service {
            "grpc.health.v1.Health" => "health",
            s if s.starts_with("grpc.reflection.") => "reflection",
            _ => "unknown",
        },
        Some("gateway") => crate::telemetry::GATEWAY,
        Some("tokenizer") => crate::telemetry::TOKENIZER,
        Some("vision") => crate::telemetry::VISION,
        Some("generation") => crate::telemetry::GENERATOR,
        _ => "unknown",
    }
}

/// The canonical name of a gRPC status code (a closed set, for the `code` label).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn header_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// tonic answers a request message it cannot decode (invalid UTF-8 in a string field, a
/// malformed protobuf) with INTERNAL, as if the server had failed; the caller sent bad input,
/// so it becomes INVALID_ARGUMENT (the message, tonic's, names the field and never its value).
fn request_decode_is_invalid_argument(headers: &mut http::HeaderMap) -> Option<tonic::Code> {
    if header_code(headers) != Some(tonic::Code::Internal) {
        return None;
    }
    let status = Status::from_header_map(headers)?;
    if !status
        .message()
        .starts_with("failed to decode Protobuf message")
    {
        return None;
    }
    headers.insert(
        "grpc-status",
        http::HeaderValue::from(tonic::Code::InvalidArgument as i32),
    );
    Some(tonic::Code::InvalidArgument)
}

/// What is recorded once a call ends.
struct CallRecord {
    service: &'static str,
    method: String,
    task: &'static str,
    started: StdInstant,
    span: tracing::Span,
}

impl CallRecord {
    fn finish(self, code: tonic::Code) {
        let m = crate::metrics::metrics();
        // An unknown method answers UNIMPLEMENTED: its name would be an open label.
        let method = if code == tonic::Code::Unimplemented || self.service == "unknown" {
            "unknown"
        } else {
            self.method.as_str()
        };
        let name = code_name(code);
        m.requests
            .with_label_values(&[self.service, method, self.task, name])
            .inc();
        m.e2e_latency
            .with_label_values(&[self.service, method, self.task])
            .observe(self.started.elapsed().as_secs_f64());
        self.span.record("rpc.grpc.status_code", code as i32);
        if code != tonic::Code::Ok {
            self.span
                .set_status(opentelemetry::trace::Status::error(name));
        }
    }
}

/// The response body, watched for its end: the gRPC status (in the trailers, or in the headers
/// of a trailers-only answer) is recorded when the last frame passes, or CANCELLED when the
/// caller drops the stream first.
struct ObservedBody {
    inner: Body,
    header_code: Option<tonic::Code>,
    record: Option<CallRecord>,
}

impl ObservedBody {
    fn end(&mut self, code: tonic::Code) {
        if let Some(r) = self.record.take() {
            r.finish(code);
        }
    }
}

impl http_body::Body for ObservedBody {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(header_code) {
                    self.end(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(tonic::Code::Internal),
            Poll::Ready(None) => {
                let code = self.header_code.unwrap_or(tonic::Code::Unknown);
                self.end(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // Dropped before its end: the caller went away (or the connection did).
        let code = if self.inner.is_end_stream() {
            self.header_code.unwrap_or(tonic::Code::Unknown)
        } else {
            tonic::Code::Cancelled
        };
        self.end(code);
    }
}

/// The per-call span: INFO for our services (exported), DEBUG for health and reflection.
fn call_span(
    path: &str,
    grpc_service: &str,
    method: &str,
    service: &str,
    task: &str,
) -> tracing::Span {
    let name = path.trim_start_matches('/');
    macro_rules! rpc_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "rpc",
                otel.name = %name,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %grpc_service,
                rpc.method = %method,
                medgemma.service = service,
                medgemma.task = task,
                rpc.grpc.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            )
        };
    }
    if service.starts_with("medgemma") {
        rpc_span!(tracing::Level::INFO)
    } else {
        rpc_span!(tracing::Level::DEBUG)
    }
}

impl<S, B> Service<http::Request<B>> for RpcService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let arrived = Instant::now();
        let started = StdInstant::now();
        // The path names the service and method; nothing from the body or other headers.
        let path = request.uri().path().to_owned();
        let (grpc_service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let service = service_of(grpc_service);
        let task = task_of(
            method,
            request
                .headers()
                .get(TASK_HEADER)
                .and_then(|v| v.to_str().ok()),
        );
        let span = call_span(&path, grpc_service, method, service, task);
        let parent_cx = trace::propagator().extract(&HeaderExtractor(request.headers()));
        // Without the OpenTelemetry layer (tests) this does nothing; the fallback below holds.
        let _ = span.set_parent(parent_cx);
        let ctx = trace::from_otel(&span.context()).unwrap_or_else(|| {
            request
                .headers()
                .get(trace::TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(TraceContext::parse)
                .map_or_else(TraceContext::new_root, |p| p.child())
        });
        span.record("trace_id", tracing::field::display(ctx.trace_id()));
        span.record("span_id", tracing::field::display(ctx.span_id()));
        let deadline = Deadline::from_headers(request.headers(), arrived);
        request.extensions_mut().insert(ctx);
        request.extensions_mut().insert(Task(task));
        if deadline.instant().is_some() {
            request.extensions_mut().insert(deadline);
        }
        let record = CallRecord {
            service,
            method: method.to_owned(),
            task,
            started,
            span: span.clone(),
        };
        // The clone is ready only if `self.inner` was; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = async move {
            let call = inner.call(request);
            let response = match deadline.instant() {
                None => call.await?,
                Some(at) => match tokio::time::timeout_at(at, call).await {
                    Ok(response) => response?,
                    Err(_) => {
                        tracing::debug!("deadline expired before the response started");
                        Status::deadline_exceeded("the deadline expired").into_http()
                    }
                },
            };
            let mut response = response;
            let header_code = request_decode_is_invalid_argument(response.headers_mut())
                .or_else(|| header_code(response.headers()));
            tracing::debug!(
                grpc.status = header_code.map_or("in trailers", code_name),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "rpc response started"
            );
            Ok(response.map(|inner| {
                Body::new(ObservedBody {
                    inner,
                    header_code,
                    record: Some(record),
                })
            }))
        };
        Box::pin(fut.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    fn slow_service(
        delay: Duration,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |req: http::Request<()>| async move {
            // Echo what the layer recorded, as a handler would read it.
            let has_ctx = req.extensions().get::<TraceContext>().is_some();
            let has_deadline = req.extensions().get::<Deadline>().is_some();
            tokio::time::sleep(delay).await;
            let mut response = http::Response::new(Body::empty());
            response.headers_mut().insert(
                "x-seen",
                format!("{has_ctx},{has_deadline}").parse().unwrap(),
            );
            Ok::<_, Infallible>(response)
        })
    }

    #[tokio::test]
    async fn records_trace_context_and_deadline() {
        let svc = RpcLayer.layer(slow_service(Duration::ZERO));
        let request = http::Request::builder()
            .uri("/medgemma.x.v1.X/Y")
            .header("grpc-timeout", "5S")
            .body(())
            .unwrap();
        // The body's end records the call (no status at all: UNKNOWN).
        let before = crate::metrics::metrics()
            .requests
            .with_label_values(&["unknown", "unknown", "none", "UNKNOWN"])
            .get();
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["x-seen"], "true,true");
        http_body_util_collect(response.into_body()).await;
        let after = crate::metrics::metrics()
            .requests
            .with_label_values(&["unknown", "unknown", "none", "UNKNOWN"])
            .get();
        assert_eq!(after, before + 1);
    }

    async fn http_body_util_collect(mut body: Body) {
        use http_body::Body as _;
        while let Some(frame) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            let _ = frame;
        }
    }

    #[test]
    fn tasks_and_services_are_closed_sets() {
        assert_eq!(task_of("SummarizeClinicalNoteStream", None), "summarize");
        assert_eq!(task_of("GenerateStream", Some("mcq")), "mcq");
        assert_eq!(task_of("GenerateStream", Some("free text")), "none");
        assert_eq!(
            service_of("medgemma.generation.v1.Generator"),
            "medgemma-generator"
        );
        assert_eq!(
            service_of("medgemma.tokenizer.v1.Tokenizer"),
            "medgemma-tokenizer"
        );
        assert_eq!(service_of("evil.Service"), "unknown");
        assert_eq!(service_of("grpc.health.v1.Health"), "health");
    }

    #[tokio::test]
    async fn an_expired_deadline_answers_deadline_exceeded() {
        let svc = RpcLayer.layer(slow_service(Duration::from_secs(10)));
        let request = http::Request::builder()
            .uri("/medgemma.x.v1.X/Y")
            .header("grpc-timeout", "50m")
            .body(())
            .unwrap();
        let t = std::time::Instant::now();
        let response = svc.oneshot(request).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }
}
