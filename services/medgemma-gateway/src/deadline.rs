//! Deadlines: the caller's `grpc-timeout` (optionally capped), forwarded as the remaining time on every
//! downstream call, enforced by the gateway itself too.

use std::time::Duration;

use tokio::time::Instant;

/// When a task must be done, if ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    /// No deadline.
    pub const NONE: Self = Self(None);

    /// The deadline of an incoming call (recorded by `medgemma_rpc::RpcLayer` on arrival, else
    /// its `grpc-timeout`), bounded by `cap` when one is configured.
    pub fn of<T>(req: &tonic::Request<T>, cap: Option<Duration>) -> Self {
        let asked = medgemma_rpc::deadline::deadline(req).map(|d| d.0);
        let capped = cap.and_then(|c| Instant::now().checked_add(c));
        Self(match (asked, capped) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        })
    }

    /// A deadline `after` from now.
    pub fn after(after: Duration) -> Self {
        Self(Some(Instant::now() + after))
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

    /// Sets the remaining time as the request's `grpc-timeout`.
    pub fn apply<T>(self, req: &mut tonic::Request<T>) {
        if let Some(r) = self.remaining() {
            // A zero timeout would read as "no deadline" to some servers: 1 ms is already over.
            req.set_timeout(r.max(Duration::from_millis(1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metadata_and_cap() {
        let mut req = tonic::Request::new(());
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
