//! Deadlines: the `grpc-timeout` a caller sent, as an instant; the one `Deadline` type of the
//! services (the gateway forwards and enforces it, the generator and vision services stop
//! waiting work at it).
//!
//! [`RpcLayer`](crate::RpcLayer) turns the header into a [`Deadline`] in the request's
//! extensions when the call arrives, so the time a request waits (in a queue, behind another
//! hop) counts against it. Handlers read it with [`Deadline::of`], what is left with
//! [`remaining`].

use std::time::Duration;

use tokio::time::Instant;
use tonic::Request;

/// The gRPC timeout header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// When the caller stops waiting, if ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// No deadline.
    pub const NONE: Self = Self(None);

    /// A deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Self(Some(instant))
    }

    /// A deadline `after` from now (none if that is too far to represent).
    pub fn after(after: Duration) -> Self {
        Self(Instant::now().checked_add(after))
    }

    /// The deadline of a request: the one [`RpcLayer`](crate::RpcLayer) recorded on arrival,
    /// else the `grpc-timeout` in its metadata counted from now; bounded by `cap` when one is
    /// given.
    pub fn of<T>(request: &Request<T>, cap: Option<Duration>) -> Self {
        let asked = request
            .extensions()
            .get::<Deadline>()
            .and_then(|d| d.0)
            .or_else(|| {
                let timeout = request
                    .metadata()
                    .get(GRPC_TIMEOUT)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_grpc_timeout)?;
                Instant::now().checked_add(timeout)
            });
        let capped = cap.and_then(|c| Instant::now().checked_add(c));
        Self(match (asked, capped) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        })
    }

    /// The deadline of a call that arrived at `now` with these headers.
    pub fn from_headers(headers: &http::HeaderMap, now: Instant) -> Self {
        let timeout = headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        // A timeout too large to add is no deadline at all.
        Self(timeout.and_then(|t| now.checked_add(t)))
    }

    /// The instant, if any.
    pub fn instant(self) -> Option<Instant> {
        self.0
    }

    /// Time left: `None` without a deadline, `Some(ZERO)` once passed.
    pub fn remaining(self) -> Option<Duration> {
        self.0.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether the deadline has passed.
    pub fn expired(self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }

    /// Sleeps until the deadline (forever without one).
    pub async fn sleep(self) {
        match self.0 {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }

    /// Sets the remaining time as an outgoing request's `grpc-timeout`.
    pub fn apply<T>(self, req: &mut Request<T>) {
        if let Some(r) = self.remaining() {
            // A zero timeout would read as "no deadline" to some servers: 1 ms is already over.
            req.set_timeout(r.max(Duration::from_millis(1)));
        }
    }
}

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

/// Time left before the request's deadline (zero once passed); `None` when it has none.
pub fn remaining<T>(request: &Request<T>) -> Option<Duration> {
    Deadline::of(request, None).remaining()
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
        req.extensions_mut().insert(Deadline::at(at));
        assert_eq!(remaining(&req), Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn metadata_and_cap() {
        let mut req = Request::new(());
        assert_eq!(Deadline::of(&req, None), Deadline::NONE);
        req.set_timeout(Duration::from_secs(10));
        let d = Deadline::of(&req, Some(Duration::from_secs(1)));
        assert!(d.remaining().unwrap() <= Duration::from_secs(1));
        let d = Deadline::of(&req, None);
        assert!(d.remaining().unwrap() > Duration::from_secs(9));
        assert!(!d.expired());
        assert!(Deadline::after(Duration::ZERO).expired());
    }
}
