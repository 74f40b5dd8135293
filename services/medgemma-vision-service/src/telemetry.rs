//! The vision service's metrics and spans: queue wait per request, one span per encoder batch
//! (its image decode and tower forward spans come from the vision crate), encode time and
//! image counts. Counts and times only, never pixels or DICOM tags.

use std::time::{Duration, Instant, SystemTime};

use medgemma_rpc::metrics::metrics;
use medgemma_rpc::telemetry::{VISION, record_span};

/// The vision service's engine index (one encoder per process, or per suite).
const ENGINE: &str = "0";

/// Requests now waiting for the encoder thread.
pub(crate) fn waiting(model_id: &str, n: usize) {
    metrics()
        .waiting
        .with_label_values(&[VISION, model_id, ENGINE])
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// A job the encoder thread took at `taken`, queued at `enqueued`: its queue time and span.
pub(crate) fn queued(model_id: &str, span: &tracing::Span, enqueued: Instant, taken: Instant) {
    let waited = taken.saturating_duration_since(enqueued);
    metrics()
        .queue_time
        .with_label_values(&[VISION, model_id, ENGINE])
        .observe(waited.as_secs_f64());
    let end = SystemTime::now() - taken.elapsed();
    record_span(span, "queue", VISION, end - waited, end, vec![]);
}

/// The span of one encoder batch, a child of its first job's RPC span.
pub(crate) fn batch_span(first: &tracing::Span, jobs: usize, images: usize) -> tracing::Span {
    tracing::info_span!(
        parent: first,
        "vision.batch",
        medgemma.batch_size = jobs,
        medgemma.image_count = images,
    )
}

/// Images by outcome (`encoded`, `cached`, `failed`).
pub(crate) fn images(outcome: &str, n: usize) {
    if n > 0 {
        metrics()
            .vision_images
            .with_label_values(&[outcome])
            .inc_by(n as u64);
    }
}

/// One `encode_bytes_batch` call that took `took`.
pub(crate) fn encoded<T, E, F>(took: Duration, result: &Result<Vec<Result<T, E>>, F>) {
    metrics().vision_encode.observe(took.as_secs_f64());
    match result {
        Ok(per_image) => {
            let ok = per_image.iter().filter(|r| r.is_ok()).count();
            images("encoded", ok);
            images("failed", per_image.len() - ok);
        }
        Err(_) => images("failed", 1),
    }
}
