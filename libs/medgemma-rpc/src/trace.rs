//! W3C trace context (`traceparent`) and `baggage` carried in gRPC metadata across every hop.
//!
//! [`RpcLayer`](crate::RpcLayer) extracts the caller's context (or starts a new trace), makes
//! this hop's span id, and stores the result in the request's extensions; a handler reads it
//! with [`current`] and passes it on with [`propagate`] (or [`inject`]) on every outgoing call.
//! With telemetry initialised ([`crate::telemetry`]) the ids are the OpenTelemetry span's and
//! [`inject`] writes the context of the current tracing span (the innermost, e.g. the gateway's
//! `encode` span), baggage included; without it, only the ids in [`TraceContext`] travel.
//! Nothing from the request body ever does.

use std::fmt;

use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tonic::Request;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header name, as gRPC metadata keys are: lower case.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C baggage header.
pub const BAGGAGE: &str = "baggage";

/// W3C trace context and baggage, the two propagators every hop speaks.
pub(crate) fn propagator() -> &'static TextMapCompositePropagator {
    static P: std::sync::LazyLock<TextMapCompositePropagator> = std::sync::LazyLock::new(|| {
        TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ])
    });
    &P
}

/// Reads propagation headers from an HTTP request (the server side).
pub(crate) struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// This hop's ids from an OpenTelemetry context, when it holds a valid span.
pub(crate) fn from_otel(cx: &opentelemetry::Context) -> Option<TraceContext> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| TraceContext {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        sampled: sc.is_sampled(),
    })
}

/// One hop of a trace: the trace id, this span's id, and the sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
}

fn nonzero_u128() -> u128 {
    loop {
        let v: u128 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl TraceContext {
    /// A new trace (random trace and span ids), sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero_u128(),
            span_id: nonzero_u64(),
            sampled: true,
        }
    }

    /// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`). Rejects version `ff`,
    /// all-zero ids, upper-case hex and wrong lengths; accepts later versions' extra fields as
    /// the spec asks.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        if !lower_hex(version, 2) || version == "ff" {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if !lower_hex(trace_id, 32) || !lower_hex(span_id, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace_id, 16).ok()?;
        let span_id = u64::from_str_radix(span_id, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// A child span of this one: same trace, new span id.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_u64(),
            ..*self
        }
    }

    /// The trace id, 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// This span's id, 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// Whether the caller asked for this trace to be recorded.
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    /// The `traceparent` value naming this span as the parent.
    pub fn to_traceparent(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// The caller's trace context from gRPC metadata, if it sent a valid one.
pub fn extract(metadata: &MetadataMap) -> Option<TraceContext> {
    metadata
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
}

/// Writes the trace context of an outgoing call: the current tracing span's OpenTelemetry
/// context (`traceparent` naming it as the parent, and the `baggage` it carries) when it is
/// part of `ctx`'s trace, else `ctx` itself as the `traceparent`.
pub fn inject(ctx: &TraceContext, metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    if from_otel(&cx).is_some_and(|c| c.trace_id == ctx.trace_id) {
        propagator().inject_context(&cx, &mut MetadataInjector(metadata));
        return;
    }
    // Always ASCII hex and dashes, so the conversion cannot fail.
    if let Ok(value) = MetadataValue::try_from(ctx.to_traceparent()) {
        metadata.insert(TRACEPARENT, value);
    }
}

/// This hop's trace context: the one [`RpcLayer`](crate::RpcLayer) stored, else one extracted
/// from the metadata (as a child), else a new trace.
pub fn current<T>(request: &Request<T>) -> TraceContext {
    request
        .extensions()
        .get::<TraceContext>()
        .copied()
        .or_else(|| extract(request.metadata()).map(|c| c.child()))
        .unwrap_or_else(TraceContext::new_root)
}

/// Prepares an outgoing call made while serving `incoming`: the trace continues (this hop is the
/// parent) and the remaining deadline carries over as `grpc-timeout`.
pub fn propagate<T, U>(incoming: &Request<T>, outgoing: &mut Request<U>) {
    inject(&current(incoming), outgoing.metadata_mut());
    if let Some(remaining) = crate::deadline::remaining(incoming) {
        outgoing.set_timeout(remaining);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let ctx = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id(), "00f067aa0ba902b7");
        assert!(ctx.sampled());
        assert_eq!(ctx.to_traceparent(), EXAMPLE);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn child_keeps_the_trace_and_changes_the_span() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(root.trace_id(), child.trace_id());
        assert_ne!(root.span_id(), child.span_id());
    }

    #[test]
    fn inject_then_extract_round_trips() {
        let ctx = TraceContext::parse(EXAMPLE).unwrap();
        let mut md = MetadataMap::new();
        inject(&ctx, &mut md);
        assert_eq!(extract(&md), Some(ctx));
    }

    #[test]
    fn propagate_continues_the_trace_and_the_deadline() {
        let mut incoming = Request::new(());
        incoming
            .metadata_mut()
            .insert(TRACEPARENT, EXAMPLE.parse().unwrap());
        incoming.set_timeout(std::time::Duration::from_secs(5));
        let mut outgoing = Request::new(());
        propagate(&incoming, &mut outgoing);
        let out = extract(outgoing.metadata()).unwrap();
        assert_eq!(out.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(out.span_id(), "00f067aa0ba902b7");
        let remaining = crate::deadline::remaining(&outgoing).unwrap();
        assert!(remaining <= std::time::Duration::from_secs(5));
        assert!(remaining > std::time::Duration::from_secs(4));
    }
}
