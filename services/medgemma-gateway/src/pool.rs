//! Client-side load balancing over the replicas of one pool.
//!
//! A pool is a list of `host:port` targets. Each target is resolved (DNS names to every address
//! they hold: a Kubernetes headless Service lists one per pod) at start and again every
//! `resolve_interval`, so replicas added later get traffic and removed ones stop getting it.
//! Every address gets its own lazily connected HTTP/2 channel; calls go round robin over them.
//! A replica that answers UNAVAILABLE (down, restarting, draining) is skipped for a while and the
//! call is retried on the next one, as long as nothing has been sent to the caller yet. Retries
//! are bounded three ways: at most `max_attempts` replicas per call, a per-pool [`RetryBudget`]
//! (retries at most a fixed share of first attempts: a failing pool is not hit with a retry
//! storm), and a jittered exponential backoff before each retry. Only UNAVAILABLE and a full
//! queue are retried: a status that names the request as the cause (INVALID_ARGUMENT,
//! INTERNAL from a replica that failed on it, ...) goes back to the caller.

use std::collections::BTreeMap;
#[cfg(test)]
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use medgemma_rpc::tls::ClientTls;
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::error::{GatewayError, is_retryable};

/// How long a replica that answered UNAVAILABLE goes to the back of the line.
const PENALTY: Duration = Duration::from_secs(5);
/// How long connecting to a replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries a quiet pool may make before first attempts have earned any.
const RETRY_RESERVE: f64 = 10.0;
/// The most retries a busy pool may bank.
const RETRY_CAP: f64 = 100.0;
/// The first retry's backoff bound; it doubles per retry up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Retries as a share of first attempts (a token bucket): each first attempt deposits `ratio`,
/// each retry spends one; a small reserve lets a quiet pool retry at all.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    balance: Mutex<f64>,
}

impl RetryBudget {
    /// A budget of `ratio` retries per first attempt (0.2: at most 20% extra load, beyond the
    /// reserve).
    pub fn new(ratio: f64) -> Self {
        Self {
            ratio,
            balance: Mutex::new(RETRY_RESERVE),
        }
    }

    fn deposit(&self) {
        if let Ok(mut b) = self.balance.lock() {
            *b = (*b + self.ratio).min(RETRY_CAP);
        }
    }

    /// Spends one retry if the budget holds one.
    pub fn try_spend(&self) -> bool {
        match self.balance.lock() {
            Ok(mut b) if *b >= 1.0 => {
                *b -= 1.0;
                true
            }
            _ => false,
        }
    }
}

/// The wait before retry number `retry` (1 for the first): uniform in [0, min(1 s, 25 ms x
/// 2^(retry-1))] ("full jitter": retries of many callers spread out instead of arriving
/// together).
pub fn backoff(retry: u32) -> Duration {
    let bound = BACKOFF_BASE
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    bound.mul_f64(rand::random::<f64>())
}

/// One address of a pool with its channel.
#[derive(Debug)]
pub struct Replica {
    addr: SocketAddr,
    channel: Channel,
    down_until: Mutex<Option<Instant>>,
}

impl Replica {
    /// A replica at `addr`; over TLS when `tls` is set, the server's certificate checked
    /// against `host` (the target's name, not the address it resolved to).
    fn new(addr: SocketAddr, host: &str, tls: Option<&ClientTls>) -> Self {
        // `SocketAddr` formats IPv6 with brackets, as a URI authority needs.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid authority")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = medgemma_rpc::tls::channel_lazy(endpoint, tls, Some(host));
        Self {
            addr,
            channel,
            down_until: Mutex::new(None),
        }
    }

    /// The replica's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its channel (cheap to clone).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn is_down(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .map(|d| d.is_some_and(|t| t > now))
            .unwrap_or(false)
    }

    fn mark_down(&self) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some(Instant::now() + PENALTY);
        }
    }

    fn mark_up(&self) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = None;
        }
    }
}

/// The replicas of one pool.
#[derive(Debug)]
pub struct Pool {
    name: &'static str,
    flag: &'static str,
    targets: Vec<String>,
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    next: AtomicUsize,
    max_attempts: usize,
    budget: RetryBudget,
    tls: Option<ClientTls>,
}

impl Pool {
    /// A pool of `targets` (`host:port`), not resolved yet. `flag` names the option that
    /// configures it (for error messages).
    pub fn new(name: &'static str, flag: &'static str, targets: Vec<String>) -> Self {
        let targets = targets
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        Self {
            name,
            flag,
            targets,
            replicas: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            max_attempts: 3,
            budget: RetryBudget::new(0.2),
            tls: None,
        }
    }

    /// At most `max_attempts` replicas per call, retries at most `budget_ratio` of first
    /// attempts (`--max-attempts`, `--retry-budget`).
    pub fn with_retries(mut self, max_attempts: u32, budget_ratio: f64) -> Self {
        self.max_attempts = max_attempts.max(1) as usize;
        self.budget = RetryBudget::new(budget_ratio);
        self
    }

    /// Connects to the replicas over TLS (`None`: plaintext), each replica's certificate
    /// checked against its target's host name.
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The pool's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The configured targets.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// The addresses now in rotation.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.snapshot().iter().map(|r| r.addr).collect()
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Resolves every target again and updates the rotation: new addresses get a channel,
    /// vanished ones are dropped, kept ones keep their channel. A target that fails to resolve
    /// keeps its previous addresses (a DNS blip must not empty a pool).
    pub async fn refresh(&self) {
        if self.targets.is_empty() {
            return;
        }
        let old = self.snapshot();
        // Each address with the host name of the target it came from (what TLS checks).
        let mut addrs = BTreeMap::new();
        for target in &self.targets {
            let host = target_host(target);
            match tokio::net::lookup_host(target.as_str()).await {
                Ok(found) => addrs.extend(found.map(|a| (a, host.clone()))),
                Err(e) => {
                    tracing::warn!(pool = self.name, %target, error = %e, "cannot resolve; keeping its previous addresses");
                    if let Ok(port) = target.rsplit(':').next().unwrap_or_default().parse::<u16>() {
                        addrs.extend(
                            old.iter()
                                .filter(|r| r.addr.port() == port)
                                .map(|r| (r.addr, host.clone())),
                        );
                    }
                }
            }
        }
        let unchanged = addrs.len() == old.len() && old.iter().all(|r| addrs.contains_key(&r.addr));
        if unchanged {
            return;
        }
        let replicas: Vec<Arc<Replica>> = addrs
            .into_iter()
            .map(|(a, host)| {
                old.iter()
                    .find(|r| r.addr == a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Replica::new(a, &host, self.tls.as_ref())))
            })
            .collect();
        tracing::info!(pool = self.name, replicas = ?replicas.iter().map(|r| r.addr).collect::<Vec<_>>(), "pool membership changed");
        match self.replicas.write() {
            Ok(mut w) => *w = Arc::new(replicas),
            Err(p) => *p.into_inner() = Arc::new(replicas),
        }
    }

    /// Replicas in the order a call should try them: round robin, those that failed recently
    /// last.
    pub fn candidates(&self) -> Result<Vec<Arc<Replica>>, GatewayError> {
        let all = self.snapshot();
        if all.is_empty() {
            return Err(GatewayError::NoReplicas {
                pool: self.name,
                reason: if self.targets.is_empty() {
                    format!("none configured (set {})", self.flag)
                } else {
                    format!("{} resolved to no address", self.targets.join(","))
                },
            });
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % all.len();
        let now = Instant::now();
        let rotated = all.iter().cycle().skip(start).take(all.len()).cloned();
        let (up, down): (Vec<_>, Vec<_>) = rotated.partition(|r| !r.is_down(now));
        Ok(up.into_iter().chain(down).collect())
    }

    /// Runs `call` on one replica after another until one neither is UNAVAILABLE nor turns
    /// the request away as overloaded (a full queue: RESOURCE_EXHAUSTED with RetryInfo, see
    /// `medgemma_rpc::overloaded`). An overloaded replica stays up; when every replica is
    /// full the caller gets that RESOURCE_EXHAUSTED with its RetryInfo. `call` must not have
    /// sent anything to the gateway's caller before it returns (retrying after that would
    /// repeat output).
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, GatewayError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last: Option<Status> = None;
        let candidates = self.candidates()?;
        for (attempt, replica) in candidates.into_iter().take(self.max_attempts).enumerate() {
            if attempt == 0 {
                self.budget.deposit();
            } else {
                if !self.budget.try_spend() {
                    tracing::warn!(pool = self.name, "retry budget spent; not retrying");
                    break;
                }
                tokio::time::sleep(backoff(attempt as u32)).await;
            }
            match call(replica.channel()).await {
                Ok(v) => {
                    replica.mark_up();
                    return Ok(v);
                }
                Err(status) if medgemma_rpc::is_overloaded(&status) => {
                    tracing::debug!(pool = self.name, replica = %replica.addr, "replica queue full; trying the next one");
                    last = Some(status);
                }
                Err(status) if is_retryable(&status) => {
                    tracing::warn!(pool = self.name, replica = %replica.addr, code = ?status.code(), "replica unavailable; trying the next one");
                    replica.mark_down();
                    last = Some(status);
                }
                Err(status) => {
                    return Err(GatewayError::Upstream {
                        pool: self.name,
                        status,
                    });
                }
            }
        }
        Err(GatewayError::Upstream {
            pool: self.name,
            status: last.unwrap_or_else(|| Status::unavailable("no replica answered")),
        })
    }
}

impl Pool {
    /// Asks every replica's `grpc.health.v1` (whole server) within `timeout`: those not
    /// SERVING go to the back of the line, those SERVING are put back. Returns how many
    /// serve.
    pub async fn check_health(&self, timeout: Duration) -> usize {
        let mut serving = 0;
        for r in self.snapshot().iter() {
            let status = tokio::time::timeout(
                timeout,
                medgemma_rpc::client::health_status(r.channel(), ""),
            )
            .await;
            let ok = matches!(status, Ok(Ok(medgemma_rpc::client::ServingStatus::Serving)));
            if ok {
                serving += 1;
                r.mark_up();
            } else {
                r.mark_down();
            }
        }
        serving
    }
}

/// How often the gateway asks its replicas for their health.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps `health` true to the pools: NOT_SERVING while a configured pool has no replica that
/// reports SERVING (the gateway could serve none of its tasks), SERVING otherwise. Runs until
/// dropped; stop it before the drain flips health for good.
pub async fn watch_pools(pools: Vec<Arc<Pool>>, health: medgemma_rpc::Health, interval: Duration) {
    let mut serving = true;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut empty = Vec::new();
        for p in pools.iter().filter(|p| !p.targets().is_empty()) {
            if p.check_health(interval).await == 0 {
                empty.push(p.name());
            }
        }
        match (serving, empty.is_empty()) {
            (true, false) => {
                tracing::warn!(pools = ?empty, "no healthy replica; health: not serving");
                health.set_not_serving().await;
                serving = false;
            }
            (false, true) => {
                tracing::info!("every pool has a healthy replica again");
                health.set_serving().await;
                serving = true;
            }
            _ => {}
        }
    }
}

/// The host of a `host:port` target (IPv6 brackets removed).
fn target_host(target: &str) -> String {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Re-resolves `pools` every `interval` until the task is dropped.
pub async fn resolve_forever(pools: Vec<Arc<Pool>>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        for p in &pools {
            p.refresh().await;
        }
    }
}

/// Parses a duration: `500ms`, `30s`, `2m`, `1h`, or plain seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"));
    }
    Duration::try_from_secs_f64(v * mult).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn empty_pool_is_unavailable_with_the_flag() {
        let p = Pool::new("text", "--text-pool / MEDGEMMA_TEXT_POOL", vec![" ".into()]);
        p.refresh().await;
        let e = p.candidates().unwrap_err();
        let s: Status = e.into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("--text-pool"), "{}", s.message());
    }

    #[tokio::test]
    async fn round_robin_and_penalty() {
        let p = Pool::new(
            "text",
            "--text-pool",
            vec![
                "127.0.0.1:1".into(),
                "127.0.0.1:2".into(),
                "localhost:3".into(),
            ],
        );
        p.refresh().await;
        assert!(p.addrs().len() >= 3, "{:?}", p.addrs());
        let firsts: BTreeSet<SocketAddr> = (0..p.addrs().len())
            .map(|_| p.candidates().unwrap()[0].addr())
            .collect();
        assert_eq!(firsts.len(), p.addrs().len(), "every replica leads once");
        let c = p.candidates().unwrap();
        c[0].mark_down();
        for _ in 0..5 {
            let order = p.candidates().unwrap();
            assert_eq!(order.last().unwrap().addr(), c[0].addr());
        }
        // Refreshing with the same answer keeps the channels (and the penalty).
        p.refresh().await;
        assert_eq!(p.candidates().unwrap().last().unwrap().addr(), c[0].addr());
    }

    #[tokio::test]
    async fn call_skips_unavailable_and_full_replicas_but_not_other_errors() {
        let p = Pool::new(
            "text",
            "--text-pool",
            vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        );
        p.refresh().await;
        let mut tries = 0;
        let r: Result<(), _> = p
            .call(|_| {
                tries += 1;
                async { Err(Status::unavailable("down")) }
            })
            .await;
        assert_eq!(tries, 2);
        assert!(matches!(r, Err(GatewayError::Upstream { .. })));
        let mut tries = 0;
        let r: Result<(), _> = p
            .call(|_| {
                tries += 1;
                async { Err(Status::resource_exhausted("full")) }
            })
            .await;
        assert_eq!(
            tries, 1,
            "a request too big for one replica is too big for all"
        );
        let s: Status = r.unwrap_err().into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        // A full queue (RetryInfo) sends the request on to the next replica...
        let mut tries = 0;
        let r: Result<u32, _> = p
            .call(|_| {
                tries += 1;
                let t = tries;
                async move {
                    if t == 1 {
                        Err(medgemma_rpc::overloaded("full", Duration::from_millis(500)))
                    } else {
                        Ok(t)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 2);
        // ...and when every queue is full the caller gets RESOURCE_EXHAUSTED with RetryInfo.
        let r: Result<(), _> = p
            .call(|_| async { Err(medgemma_rpc::overloaded("full", Duration::from_millis(500))) })
            .await;
        let s: Status = r.unwrap_err().into();
        assert!(medgemma_rpc::is_overloaded(&s), "{s:?}");
    }

    #[tokio::test]
    async fn retries_are_bounded_by_attempts_and_budget_with_jittered_backoff() {
        let targets: Vec<String> = (1..=5).map(|p| format!("127.0.0.1:{p}")).collect();
        let p = Pool::new("text", "--text-pool", targets).with_retries(3, 0.2);
        p.refresh().await;
        let tries = AtomicUsize::new(0);
        let unavailable = || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(Status::unavailable("down"))
        };
        // Five replicas, but at most three attempts per call.
        let _ = p.call(|_| unavailable()).await;
        assert_eq!(tries.load(Ordering::Relaxed), 3);
        // A pool where every call fails: retries stop at the reserve plus 20% of first
        // attempts.
        let calls = 200;
        for _ in 1..calls {
            let _ = p.call(|_| unavailable()).await;
        }
        let retries = tries.load(Ordering::Relaxed) - calls;
        let bound = (RETRY_RESERVE + 0.2 * calls as f64).ceil() as usize;
        assert!(retries <= bound, "{retries} retries for {calls} calls");
        assert!(retries >= bound - 2, "{retries} retries for {calls} calls");
        // Backoff: jittered, growing, capped.
        let waits: Vec<Duration> = (0..200).map(|_| backoff(1)).collect();
        assert!(waits.iter().all(|w| *w <= BACKOFF_BASE));
        assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
        assert!((0..200).all(|_| backoff(30) <= BACKOFF_MAX));
        assert!((0..200).any(|_| backoff(4) > BACKOFF_BASE));
    }

    #[tokio::test]
    async fn a_request_that_failed_a_replica_is_not_replayed() {
        let p = Pool::new(
            "text",
            "--text-pool",
            vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        );
        p.refresh().await;
        for status in [
            Status::internal("the model worker stopped while generating this request"),
            Status::unknown("stream reset"),
            Status::invalid_argument("bad"),
            Status::deadline_exceeded("late"),
        ] {
            let code = status.code();
            let mut tries = 0;
            let r: Result<(), _> = p
                .call(|_| {
                    tries += 1;
                    let s = status.clone();
                    async move { Err(s) }
                })
                .await;
            assert_eq!(tries, 1, "{code:?}");
            assert_eq!(Status::from(r.unwrap_err()).code(), code);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
