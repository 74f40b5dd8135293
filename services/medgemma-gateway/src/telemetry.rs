//! The gateway's GenAI spans (OpenTelemetry GenAI semantic conventions): one `chat` span per
//! generator call, with the request's model, temperature and token budget, then the usage and
//! finish reasons of its answer. Counts and names only, never a prompt or an answer.

use medgemma_proto::generation::v1 as gen_pb;
use opentelemetry::{StringValue, Value};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::GatewayError;

/// The span of one generator call on `pool`.
pub(crate) fn chat_span(pool: &'static str, req: &gen_pb::GenerateRequest) -> tracing::Span {
    let sampling = req.sampling.unwrap_or_default();
    let span = tracing::info_span!(
        "chat",
        otel.name = tracing::field::Empty,
        otel.kind = "client",
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = medgemma_rpc::telemetry::PROVIDER,
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        medgemma.pool = pool,
        medgemma.image_count = req.image_embeddings.len() as i64,
        medgemma.constrained = req.constraint.is_some(),
    );
    if let Some(t) = sampling.temperature {
        span.set_attribute("gen_ai.request.temperature", f64::from(t));
    }
    if let Some(n) = sampling.max_new_tokens {
        span.set_attribute("gen_ai.request.max_tokens", i64::from(n));
    }
    span
}

/// Records what the generator answered (or that it failed) on `span`.
pub(crate) fn chat_done(
    span: &tracing::Span,
    result: &Result<gen_pb::GenerateResponse, GatewayError>,
) {
    let Ok(r) = result else {
        span.set_status(opentelemetry::trace::Status::error("generation failed"));
        return;
    };
    span.record("otel.name", format!("chat {}", r.model_id));
    span.record("gen_ai.request.model", r.model_id.as_str());
    if let Some(u) = &r.usage {
        span.record("gen_ai.usage.input_tokens", i64::from(u.prompt_tokens));
        span.record("gen_ai.usage.output_tokens", i64::from(u.completion_tokens));
    }
    let reason = match gen_pb::FinishReason::try_from(r.finish_reason) {
        Ok(gen_pb::FinishReason::Stop) => "stop",
        Ok(gen_pb::FinishReason::Length) => "length",
        Ok(gen_pb::FinishReason::Cancelled) => "cancelled",
        _ => "unspecified",
    };
    span.set_attribute(
        "gen_ai.response.finish_reasons",
        Value::Array(vec![StringValue::from(reason)].into()),
    );
    span.set_attribute("gen_ai.response.model", r.model_id.clone());
}
