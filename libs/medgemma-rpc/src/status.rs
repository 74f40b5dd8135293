//! INVALID_ARGUMENT with `google.rpc.BadRequest` details, RESOURCE_EXHAUSTED with
//! `google.rpc.RetryInfo` for an overloaded server, and reading them back.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One bad field: its path in the request (`sampling.top_p`, `options[2]`) and what is wrong.
/// Descriptions name limits and types, never the field's content (it may be patient data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// INVALID_ARGUMENT for one bad field, with a `google.rpc.BadRequest` detail.
pub fn bad_request(field: impl Into<String>, description: impl Into<String>) -> Status {
    bad_request_violations(vec![FieldViolation::new(field, description)])
}

/// INVALID_ARGUMENT for several bad fields; the message lists them all.
pub fn bad_request_violations(violations: Vec<FieldViolation>) -> Status {
    let message = if violations.is_empty() {
        "invalid request".to_owned()
    } else {
        let parts: Vec<String> = violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        format!("invalid request: {}", parts.join("; "))
    };
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field, v.description);
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// The field violations a status carries (empty when it has no `BadRequest` detail).
pub fn field_violations(status: &Status) -> Vec<FieldViolation> {
    status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| FieldViolation::new(v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

/// RESOURCE_EXHAUSTED for a request turned away before any work (a full queue), with a
/// `google.rpc.RetryInfo` saying when to retry. The RetryInfo is the mark [`is_overloaded`]
/// reads: such a request may go to another replica at once, unlike RESOURCE_EXHAUSTED for a
/// request that is itself too big.
pub fn overloaded(message: impl Into<String>, retry_after: Duration) -> Status {
    let details = ErrorDetails::with_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// Whether `status` came from [`overloaded`]: RESOURCE_EXHAUSTED with a RetryInfo.
pub fn is_overloaded(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted && status.get_details_retry_info().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_carries_retry_info() {
        let s = overloaded("queue full", Duration::from_millis(500));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(is_overloaded(&s));
        let info = s.get_details_retry_info().expect("RetryInfo");
        assert_eq!(info.retry_delay, Some(Duration::from_millis(500)));
        // A request that is too big is not an overload: no RetryInfo.
        assert!(!is_overloaded(&Status::resource_exhausted(
            "prompt too long"
        )));
        assert!(!is_overloaded(&Status::unavailable("down")));
    }

    #[test]
    fn bad_request_round_trips_its_violations() {
        let status = bad_request_violations(vec![
            FieldViolation::new("sampling.top_p", "must be in (0, 1]"),
            FieldViolation::new("prompt_ids", "must not be empty"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .contains("sampling.top_p: must be in (0, 1]")
        );
        assert_eq!(
            field_violations(&status),
            vec![
                FieldViolation::new("sampling.top_p", "must be in (0, 1]"),
                FieldViolation::new("prompt_ids", "must not be empty"),
            ]
        );
    }

    #[test]
    fn a_plain_status_has_no_violations() {
        assert!(field_violations(&Status::internal("x")).is_empty());
    }
}
