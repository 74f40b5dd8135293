//! The generator's metrics and spans, fed by the model thread: TTFT and inter-token latency
//! per token event, queue time, tokens and finish reasons per finished sequence, the load
//! gauges after every step, and each sequence's queue, prefill and decode phases as spans with
//! their real times (one decode span per sequence with its step count, never one per token).
//! Labels and attributes hold counts, times and names, never tokens or text.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use medgemma_engine::generate::{EngineStats, GenerationOutput, GenerationRequest};
use medgemma_rpc::metrics::metrics;
use medgemma_rpc::telemetry::{GENERATOR, record_span, record_span_in};
use opentelemetry::{KeyValue, Value};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::worker::WorkerStats;

/// The metric labels of a new engine in this process: `[model_name, engine index]`.
pub(crate) fn engine_labels(model_id: &str) -> [String; 2] {
    static ENGINES: AtomicUsize = AtomicUsize::new(0);
    [
        model_id.to_owned(),
        ENGINES.fetch_add(1, Ordering::Relaxed).to_string(),
    ]
}

fn labels(stats: &WorkerStats) -> [&str; 2] {
    [stats.labels[0].as_str(), stats.labels[1].as_str()]
}

/// After each step: running and waiting sequences, KV-cache usage, prefix-cache counters.
pub(crate) fn engine_gauges(stats: &WorkerStats, before: &EngineStats, now: &EngineStats) {
    let m = metrics();
    let l = labels(stats);
    let in_system = stats.in_system.load(Ordering::Relaxed);
    m.running
        .with_label_values(&l)
        .set(i64::try_from(now.running).unwrap_or(i64::MAX));
    m.waiting
        .with_label_values(&[GENERATOR, l[0], l[1]])
        .set(i64::try_from(in_system.saturating_sub(now.running)).unwrap_or(i64::MAX));
    let usage = match now.kv_blocks_free {
        Some(free) if now.kv_blocks_used + free > 0 => {
            now.kv_blocks_used as f64 / (now.kv_blocks_used + free) as f64
        }
        _ => 0.0,
    };
    m.kv_usage.with_label_values(&l).set(usage);
    m.prefix_queries.with_label_values(&l).inc_by(
        now.prefix_query_tokens
            .saturating_sub(before.prefix_query_tokens),
    );
    m.prefix_hits.with_label_values(&l).inc_by(
        now.prefix_hit_tokens
            .saturating_sub(before.prefix_hit_tokens),
    );
}

/// A token of a sequence that arrived at `enqueued`: TTFT for the first, ITL for the others.
pub(crate) fn token(stats: &WorkerStats, enqueued: Instant, last: Option<Instant>, now: Instant) {
    let m = metrics();
    let l = labels(stats);
    match last {
        None => m
            .ttft
            .with_label_values(&l)
            .observe(now.duration_since(enqueued).as_secs_f64()),
        Some(t) => m
            .itl
            .with_label_values(&l)
            .observe(now.duration_since(t).as_secs_f64()),
    }
}

fn system_time_of(t: Instant) -> SystemTime {
    SystemTime::now() - t.elapsed()
}

/// The span of a constraint's compilation at admission, from `start` to now.
pub(crate) fn constraint_span(parent: &tracing::Span, start: SystemTime, ok: bool) {
    record_span(
        parent,
        "constraint.compile",
        GENERATOR,
        start,
        SystemTime::now(),
        vec![KeyValue::new("medgemma.constraint.ok", ok)],
    );
}

/// A finished sequence: counters, and its queue, prefill and decode spans.
pub(crate) fn finished(
    stats: &WorkerStats,
    span: &tracing::Span,
    enqueued: Instant,
    queue_time: Duration,
    max_batch: usize,
    out: &GenerationOutput,
) {
    let m = metrics();
    let l = labels(stats);
    m.queue_time
        .with_label_values(&[GENERATOR, l[0], l[1]])
        .observe(queue_time.as_secs_f64());
    m.prompt_tokens
        .with_label_values(&l)
        .inc_by(out.prompt_token_ids.len() as u64);
    m.generation_tokens
        .with_label_values(&l)
        .inc_by(out.token_ids.len() as u64);
    let reason = out.finish_reason.as_str();
    m.request_success
        .with_label_values(&[l[0], l[1], reason])
        .inc();

    let end = SystemTime::now();
    let start = system_time_of(enqueued);
    let queued_until = (start + queue_time).min(end);
    let decode_start = end
        .checked_sub(out.decode_time)
        .unwrap_or(end)
        .max(queued_until);
    let prefill_start = decode_start
        .checked_sub(out.prefill_time)
        .unwrap_or(decode_start)
        .max(queued_until);
    record_span(span, "queue", GENERATOR, start, queued_until, vec![]);
    let prefill = record_span(
        span,
        "prefill",
        GENERATOR,
        prefill_start,
        decode_start,
        vec![
            KeyValue::new(
                "gen_ai.usage.input_tokens",
                out.prompt_token_ids.len() as i64,
            ),
            KeyValue::new(
                "medgemma.prefix_cache.tokens_reused",
                out.prefix_cached_tokens as i64,
            ),
            KeyValue::new("medgemma.prefill.chunks", out.prefill_chunks.len() as i64),
            KeyValue::new("medgemma.batch_size.max", max_batch as i64),
        ],
    );
    // One span per forward step that ran part of the prompt (not per token).
    if let Some(cx) = prefill {
        for c in &out.prefill_chunks {
            record_span_in(
                &cx,
                "prefill.chunk",
                GENERATOR,
                system_time_of(c.start),
                system_time_of(c.end),
                vec![
                    KeyValue::new("medgemma.prefill.tokens", c.tokens as i64),
                    KeyValue::new("medgemma.batch_size", c.batch as i64),
                ],
            );
        }
    }
    record_span(
        span,
        "decode",
        GENERATOR,
        decode_start,
        end,
        vec![
            KeyValue::new("medgemma.decode.steps", out.token_ids.len() as i64),
            KeyValue::new("gen_ai.usage.output_tokens", out.token_ids.len() as i64),
            KeyValue::new("medgemma.batch_size.max", max_batch as i64),
        ],
    );
    span.record(
        "gen_ai.usage.input_tokens",
        out.prompt_token_ids.len() as i64,
    );
    span.record("gen_ai.usage.output_tokens", out.token_ids.len() as i64);
    span.record("medgemma.batch_size", max_batch as i64);
    span.record(
        "medgemma.prefix_cache.tokens_reused",
        out.prefix_cached_tokens as i64,
    );
    span.set_attribute(
        "gen_ai.response.finish_reasons",
        Value::Array(vec![opentelemetry::StringValue::from(reason)].into()),
    );
}

/// The span of one generation request (GenAI conventions), the parent of its phases. Created
/// on the RPC's task, so its parent is the RPC span; the model thread closes it.
pub(crate) fn generate_span(
    model_id: &str,
    request: &GenerationRequest,
    tokens_per_image: Option<u32>,
) -> tracing::Span {
    let rows = request.image_embeds.as_ref().map_or(0, |t| t.dims()[0]);
    let images = match tokens_per_image {
        Some(n) if n > 0 => rows / n as usize,
        _ => usize::from(rows > 0),
    };
    tracing::info_span!(
        "generate",
        otel.name = %format_args!("text_completion {model_id}"),
        gen_ai.operation.name = "text_completion",
        gen_ai.provider.name = medgemma_rpc::telemetry::PROVIDER,
        gen_ai.request.model = %model_id,
        gen_ai.request.temperature = f64::from(request.sampling.temperature),
        gen_ai.request.max_tokens = request.max_new_tokens as i64,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        medgemma.batch_size = tracing::field::Empty,
        medgemma.prefix_cache.tokens_reused = tracing::field::Empty,
        medgemma.image_count = images as i64,
        medgemma.constrained = request.constraint.is_some(),
    )
}
