//! Deadlines: the `grpc-timeout` a caller sent, as an instant.
//!
//! [`RpcLayer`](crate::RpcLayer) turns the header into a [`Deadline`] in the request's
//! extensions when the call arrives, so the time a request waits (in a queue, behind another
//! hop) counts against it. Handlers read what is left with [`remaining`].

use std::time::Duration;

use tokio::time::Instant;
use tonic::Request;

/// The gRPC timeout header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// When the caller stops waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// Parses a `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline of a call that arrived at `now` with these headers, if it has one.
pub fn from_headers(headers: &http::HeaderMap, now: Instant) -> Option<Deadline> {
    let timeout = headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)?;
    // A timeout too large to add is no deadline at all.
    now.checked_add(timeout).map(Deadline)
}

/// The deadline of a request: the one [`RpcLayer`](crate::RpcLayer) recorded on arrival, else
/// the `grpc-timeout` in its metadata counted from now.
pub fn deadline<T>(request: &Request<T>) -> Option<Deadline> {
    request.extensions().get::<Deadline>().copied().or_else(|| {
        let timeout = request
            .metadata()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)?;
        Instant::now().checked_add(timeout).map(Deadline)
    })
}

/// Time left before the request's deadline (zero once passed); `None` when it has none.
pub fn remaining<T>(request: &Request<T>) -> Option<Duration> {
    deadline(request).map(|Deadline(at)| at.saturating_duration_since(Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in ["", "S", "10", "1x", "-1S", "123456789S", "1.5S", " 1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn remaining_reads_tonic_set_timeout() {
        let mut req = Request::new(());
        assert_eq!(remaining(&req), None);
        req.set_timeout(Duration::from_millis(1500));
        let left = remaining(&req).unwrap();
        assert!(left <= Duration::from_millis(1500) && left > Duration::from_millis(1000));
    }

    #[test]
    fn a_recorded_deadline_wins_over_the_header() {
        let mut req = Request::new(());
        req.set_timeout(Duration::from_secs(100));
        let at = Instant::now();
        req.extensions_mut().insert(Deadline(at));
        assert_eq!(remaining(&req), Some(Duration::ZERO));
    }
}
