//! The audit log: one JSON line per `ClinicalTasks` request, accepted or refused, written when
//! the request ends (or its caller goes away) and flushed at once.
//!
//! A line holds who called (API key name and/or client certificate subject), what task, the
//! gRPC status, token counts, latency, image count and each image's SHA-256, and the trace id.
//! Never patient content: no prompt, note, option, image byte or generated text, and no
//! status message (messages can quote request fields).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Where audit lines go.
pub struct AuditLog {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// `-` is stdout; anything else a file appended to (created owner-only).
    pub fn open(target: &Path) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if target.as_os_str() == "-" {
            Box::new(io::stdout())
        } else {
            let mut options = OpenOptions::new();
            options.append(true).create(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            Box::new(options.open(target)?)
        };
        Ok(Self::to_writer(out))
    }

    /// Lines to any writer (tests).
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }

    /// Writes one line and flushes it. A failing audit sink is logged, never fatal to the
    /// request (which has already been answered).
    pub fn write(&self, record: &AuditRecord) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        let mut out = match self.out.lock() {
            Ok(o) => o,
            Err(p) => p.into_inner(),
        };
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When the request ended, RFC 3339 UTC.
    pub time: String,
    /// The API key's name, if one authenticated the call.
    pub key: Option<String>,
    /// The subject of the client's certificate, if it presented one (mTLS).
    pub client_cert: Option<String>,
    /// The RPC as called, e.g. `AskStream`.
    pub method: String,
    /// The task (the RPC without its `Stream` suffix).
    pub task: String,
    /// The gRPC status name, e.g. `OK`, `UNAUTHENTICATED`.
    pub status: &'static str,
    /// Its numeric code.
    pub code: i32,
    /// Prompt tokens (0 when it never reached a generator).
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// From the request's arrival to its last byte.
    pub latency_ms: f64,
    /// How many images the request carried.
    pub image_count: u32,
    /// The SHA-256 of each image, hex.
    pub image_sha256: Vec<String>,
    /// The W3C trace id of the request.
    pub trace_id: Option<String>,
}

/// What a handler adds to its request's audit line (token counts, images); found in the
/// request's extensions. Handlers call it and never fail because of it.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<Noted>>);

#[derive(Debug, Default)]
struct Noted {
    prompt_tokens: u32,
    completion_tokens: u32,
    images: Vec<String>,
}

impl AuditNote {
    /// The note of `request`, or a detached one when the service runs without the guard.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or_default()
    }

    /// Records a response's token usage.
    pub fn usage(&self, usage: Option<&medgemma_proto::gateway::v1::Usage>) {
        if let (Some(u), Ok(mut n)) = (usage, self.0.lock()) {
            n.prompt_tokens = u.prompt_tokens;
            n.completion_tokens = u.completion_tokens;
        }
    }

    /// Records an image by its SHA-256 (never its bytes).
    pub fn image(&self, bytes: &[u8]) {
        let digest = hex::encode(Sha256::digest(bytes));
        if let Ok(mut n) = self.0.lock() {
            n.images.push(digest);
        }
    }
}

/// Responses that carry token usage.
pub trait HasUsage {
    /// The response's usage.
    fn usage(&self) -> Option<&medgemma_proto::gateway::v1::Usage>;
}

macro_rules! has_usage {
    ($($t:ty),*) => {$(
        impl HasUsage for $t {
            fn usage(&self) -> Option<&medgemma_proto::gateway::v1::Usage> {
                self.usage.as_ref()
            }
        }
    )*};
}

has_usage!(
    medgemma_proto::gateway::v1::AskResponse,
    medgemma_proto::gateway::v1::SummarizeClinicalNoteResponse,
    medgemma_proto::gateway::v1::AnswerMultipleChoiceResponse,
    medgemma_proto::gateway::v1::DraftRadiologyReportResponse,
    medgemma_proto::gateway::v1::DeidentifyResponse
);

/// A request whose line is written when it is dropped: at the end of the response body, or
/// when the caller goes away first (then the status is CANCELLED unless one was seen).
pub(crate) struct Pending {
    pub log: Arc<AuditLog>,
    pub started: Instant,
    pub key: Option<String>,
    pub client_cert: Option<String>,
    pub method: String,
    pub trace_id: Option<String>,
    pub note: AuditNote,
    /// The final gRPC status code, once seen in headers or trailers.
    pub code: Option<tonic::Code>,
    /// Whether the response body ended normally.
    pub ended: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let code = match (self.code, self.ended) {
            (Some(c), _) => c,
            (None, true) => tonic::Code::Ok,
            (None, false) => tonic::Code::Cancelled,
        };
        let noted = match self.note.0.lock() {
            Ok(mut n) => std::mem::take(&mut *n),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        let task = self
            .method
            .strip_suffix("Stream")
            .unwrap_or(&self.method)
            .to_owned();
        self.log.write(&AuditRecord {
            time: now_rfc3339(),
            key: self.key.take(),
            client_cert: self.client_cert.take(),
            method: std::mem::take(&mut self.method),
            task,
            status: code_name(code),
            code: code as i32,
            prompt_tokens: noted.prompt_tokens,
            completion_tokens: noted.completion_tokens,
            latency_ms: self.started.elapsed().as_secs_f64() * 1e3,
            image_count: noted.images.len() as u32,
            image_sha256: noted.images,
            trace_id: self.trace_id.take(),
        });
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The canonical name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
