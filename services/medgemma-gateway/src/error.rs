//! The gateway's one error type and its one mapping to `tonic::Status`.

use medgemma_rpc::FieldViolation;
use tonic::{Code, Status};

/// Everything a task can fail with. Messages name fields, limits, pools and replicas, never
/// request content.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed.
    #[error("invalid request ({} field violations)", .0.len())]
    InvalidArgument(Vec<FieldViolation>),
    /// A pool has no replica to send to.
    #[error("the {pool} pool has no replicas: {reason}")]
    NoReplicas {
        /// The pool's name (`text`, `multimodal`, `vision`, `tokenizer`).
        pool: &'static str,
        /// Why (not configured, or its names resolved to nothing).
        reason: String,
    },
    /// A downstream service answered with an error; its code (and details) pass through.
    #[error("{pool}: {}", .status.message())]
    Upstream {
        /// The pool that answered.
        pool: &'static str,
        /// Its status.
        status: Status,
    },
    /// A downstream service answered something the gateway cannot use.
    #[error("{pool} answered an unusable response: {reason}")]
    BadUpstreamResponse {
        /// The pool that answered.
        pool: &'static str,
        /// What was wrong (shapes, counts; never content).
        reason: String,
    },
    /// The caller's deadline passed.
    #[error("deadline exceeded while {stage}")]
    DeadlineExceeded {
        /// What the task was doing.
        stage: &'static str,
    },
    /// The gateway is shutting down or the caller went away.
    #[error("cancelled")]
    Cancelled,
}

impl GatewayError {
    /// One bad field.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        let message = e.to_string();
        match e {
            GatewayError::InvalidArgument(v) => medgemma_rpc::bad_request_violations(v),
            GatewayError::NoReplicas { .. } => Status::unavailable(message),
            GatewayError::Upstream { status, .. } => {
                // A downstream call that ran out of the propagated deadline fails locally as
                // CANCELLED "Timeout expired" (tonic's client timer): that is the caller's
                // deadline, so say DEADLINE_EXCEEDED, whichever timer fired first.
                let status = medgemma_rpc::client::deadline_status(status);
                // Keep the code and the rich details (BadRequest, RetryInfo) of the callee.
                Status::with_details(status.code(), message, status.details().to_vec().into())
            }
            GatewayError::BadUpstreamResponse { .. } => Status::internal(message),
            GatewayError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
            GatewayError::Cancelled => Status::cancelled(message),
        }
    }
}

/// Whether a downstream status means "try another replica": the replica is down, restarting or
/// draining (nothing was done). tonic reports a call whose connection went away before the
/// request was sent (a draining replica's GOAWAY) as CANCELLED: the replica never saw it, so
/// it is retried too. tonic's own client-side deadline also reads CANCELLED; that one is not.
/// (The gateway's caller going away drops the call; it never returns a status here.)
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::Cancelled => {
            medgemma_rpc::client::deadline_status(status.clone()).code() == Code::Cancelled
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: Status = GatewayError::field("question", "must not be empty").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(medgemma_rpc::field_violations(&s)[0].field, "question");
        let s: Status = GatewayError::NoReplicas {
            pool: "text",
            reason: "not configured".into(),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("text pool"));
        let s: Status = GatewayError::Upstream {
            pool: "text",
            status: Status::resource_exhausted("queue full"),
        }
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.message(), "text: queue full");
        let inner = medgemma_rpc::bad_request("prompt_ids", "too long");
        let s: Status = GatewayError::Upstream {
            pool: "text",
            status: inner,
        }
        .into();
        assert_eq!(medgemma_rpc::field_violations(&s)[0].field, "prompt_ids");
    }

    #[test]
    fn unsent_calls_are_retried_but_expired_deadlines_and_failures_are_not() {
        assert!(is_retryable(&Status::unavailable("connection refused")));
        assert!(is_retryable(&Status::cancelled("operation was canceled")));
        let expired = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(expired.code(), Code::Cancelled);
        assert!(!is_retryable(&expired));
        assert!(!is_retryable(&Status::internal("panicked")));
        assert!(!is_retryable(&Status::unknown("stream reset")));
        assert!(!is_retryable(&Status::invalid_argument("bad")));
    }
}
