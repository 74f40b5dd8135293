//! The tower layer every medgemma RPC passes through: one tracing span per call (method and
//! trace id only), the trace context and deadline recorded in the request's extensions, and
//! DEADLINE_EXCEEDED when the deadline passes before the response starts.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant as StdInstant;

use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::deadline::{self, Deadline};
use crate::trace::{self, TraceContext};

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

fn grpc_status(response: &http::Response<Body>) -> &str {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0 or in trailers")
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
        let parent = request
            .headers()
            .get(trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse);
        let ctx = parent.map_or_else(TraceContext::new_root, |p| p.child());
        let deadline = deadline::from_headers(request.headers(), arrived);
        request.extensions_mut().insert(ctx);
        if let Some(d) = deadline {
            request.extensions_mut().insert(d);
        }
        // The path names the service and method; nothing from the body or other headers.
        let span = tracing::info_span!(
            "rpc",
            rpc.method = %request.uri().path(),
            trace_id = %ctx.trace_id(),
            span_id = %ctx.span_id(),
        );
        // The clone is ready only if `self.inner` was; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = async move {
            let call = inner.call(request);
            let response = match deadline {
                None => call.await?,
                Some(Deadline(at)) => match tokio::time::timeout_at(at, call).await {
                    Ok(response) => response?,
                    Err(_) => {
                        tracing::debug!("deadline expired before the response started");
                        Status::deadline_exceeded("the deadline expired").into_http()
                    }
                },
            };
            tracing::debug!(
                grpc.status = grpc_status(&response),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "rpc response started"
            );
            Ok(response)
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
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["x-seen"], "true,true");
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
