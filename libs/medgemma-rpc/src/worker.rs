//! The one way a service runs its model: on its own thread, fed by a bounded queue, every unit
//! of work under a panic guard, with a [`Pulse`] the health [`watchdog`] reads.
//!
//! ```ignore
//! let (queue, pulse) = worker::spawn("vision-encoder", capacity, move |jobs: Jobs<Job>, pulse| {
//!     while let Some(job) = jobs.recv() {
//!         if pulse.guard(|| run(job)).is_err() { /* the job failed; keep serving */ }
//!     }
//! })?;
//! queue.try_send(job)?;                           // Full: RESOURCE_EXHAUSTED, never waits
//! tokio::spawn(watchdog(health, pulse, WatchdogOptions::default()));
//! ```
//!
//! The thread gets a large stack ([`WORKER_STACK_BYTES`]): parsers of nested formats recurse.
//! When the thread ends (its body returned or panicked outside a guard) the pulse reports it
//! dead; when a unit of work runs, or jobs wait, with no progress for longer than the
//! watchdog's `wedged_after`, it reports it wedged. Either way health goes NOT_SERVING and,
//! after the grace period, the process exits non-zero so the orchestrator restarts it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::server::Health;

/// The model thread's stack: 64 MiB of address space (touched only as deep as it is used).
pub const WORKER_STACK_BYTES: usize = 64 << 20;

/// Why a job could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue holds `capacity` jobs already (answer RESOURCE_EXHAUSTED).
    Full,
    /// The thread is gone.
    Gone,
}

/// The sending side of a worker's bounded queue. Clone freely.
#[derive(Debug)]
pub struct Queue<J> {
    tx: mpsc::Sender<J>,
    pulse: Pulse,
}

impl<J> Clone for Queue<J> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            pulse: self.pulse.clone(),
        }
    }
}

impl<J> Queue<J> {
    /// Queues `job` without waiting; on failure the job comes back.
    pub fn try_send(&self, job: J) -> Result<(), (SendError, J)> {
        // Counted first: the thread may take the job at once.
        self.pulse.inner.pending.fetch_add(1, Ordering::AcqRel);
        self.tx.try_send(job).map_err(|e| {
            self.pulse.inner.pending.fetch_sub(1, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(j) => (SendError::Full, j),
                mpsc::error::TrySendError::Closed(j) => (SendError::Gone, j),
            }
        })
    }

    /// The worker's pulse.
    pub fn pulse(&self) -> &Pulse {
        &self.pulse
    }
}

/// The receiving side, owned by the worker thread.
#[derive(Debug)]
pub struct Jobs<J> {
    rx: mpsc::Receiver<J>,
    pulse: Pulse,
}

impl<J> Jobs<J> {
    /// The next job, waiting for one; `None` once every [`Queue`] is dropped.
    pub fn recv(&mut self) -> Option<J> {
        let job = self.rx.blocking_recv();
        self.took(job.is_some());
        job
    }

    /// The next job if one waits.
    pub fn try_recv(&mut self) -> Option<J> {
        let job = self.rx.try_recv().ok();
        self.took(job.is_some());
        job
    }

    fn took(&self, some: bool) {
        if some {
            self.pulse.inner.pending.fetch_sub(1, Ordering::AcqRel);
            self.pulse.progress();
        }
    }
}

#[derive(Debug)]
struct PulseInner {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last progress (a job taken, a unit of work done).
    last_progress_ms: AtomicU64,
    /// Units of work running now (0 or 1 for one thread).
    busy: AtomicUsize,
    /// Jobs queued and not yet taken.
    pending: AtomicUsize,
    alive: AtomicBool,
    panics: AtomicU64,
}

/// What a worker thread reports about itself: alive, making progress. Clone freely.
#[derive(Debug, Clone)]
pub struct Pulse {
    inner: Arc<PulseInner>,
}

/// A unit of work panicked (the panic message stays in the log, never in a reply: it may
/// quote patient data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

/// The worker's state as the watchdog sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Idle, or making progress.
    Healthy,
    /// Work is waiting or running and nothing moved for this long.
    Wedged(Duration),
    /// The thread has ended.
    Dead,
}

impl Default for Pulse {
    fn default() -> Self {
        Self {
            inner: Arc::new(PulseInner {
                epoch: Instant::now(),
                last_progress_ms: AtomicU64::new(0),
                busy: AtomicUsize::new(0),
                pending: AtomicUsize::new(0),
                alive: AtomicBool::new(true),
                panics: AtomicU64::new(0),
            }),
        }
    }
}

impl Pulse {
    /// Records progress (a job taken, a step done).
    pub fn progress(&self) {
        let ms = self.inner.epoch.elapsed().as_millis() as u64;
        self.inner.last_progress_ms.store(ms, Ordering::Release);
    }

    /// Runs one unit of work (a batch, a scheduler step) under a panic guard: a panic becomes
    /// [`Panicked`] and the thread goes on. Progress is recorded when it ends either way.
    pub fn guard<T>(&self, f: impl FnOnce() -> T) -> Result<T, Panicked> {
        self.progress();
        self.inner.busy.fetch_add(1, Ordering::AcqRel);
        let out = std::panic::catch_unwind(AssertUnwindSafe(f));
        self.inner.busy.fetch_sub(1, Ordering::AcqRel);
        self.progress();
        out.map_err(|_| {
            self.inner.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!("a unit of work panicked; its requests fail, the worker goes on");
            Panicked
        })
    }

    /// Whether the thread is still running.
    pub fn is_alive(&self) -> bool {
        self.inner.alive.load(Ordering::Acquire)
    }

    /// Units of work that panicked so far.
    pub fn panics(&self) -> u64 {
        self.inner.panics.load(Ordering::Relaxed)
    }

    /// Jobs queued and not yet taken by the thread.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// Dead, wedged (busy or with jobs waiting, and no progress for `wedged_after`), or
    /// healthy.
    pub fn state(&self, wedged_after: Duration) -> WorkerState {
        if !self.is_alive() {
            return WorkerState::Dead;
        }
        let waiting = self.inner.busy.load(Ordering::Acquire) > 0 || self.pending() > 0;
        let last = Duration::from_millis(self.inner.last_progress_ms.load(Ordering::Acquire));
        let still = self.inner.epoch.elapsed().saturating_sub(last);
        if waiting && still >= wedged_after {
            WorkerState::Wedged(still)
        } else {
            WorkerState::Healthy
        }
    }
}

/// Marks the pulse dead when the thread's body ends, returned or unwound.
struct DeathNotice(Pulse);

impl Drop for DeathNotice {
    fn drop(&mut self) {
        self.0.inner.alive.store(false, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!("the worker thread died of a panic");
        } else {
            tracing::info!("the worker thread stopped");
        }
    }
}

/// Starts `body` on a thread named `name` with a queue of `capacity` jobs (at least 1). The
/// body runs until it returns (typically when [`Jobs::recv`] gives `None`); it should run
/// each unit of work through [`Pulse::guard`].
pub fn spawn<J, F>(name: &str, capacity: usize, body: F) -> std::io::Result<(Queue<J>, Pulse)>
where
    J: Send + 'static,
    F: FnOnce(Jobs<J>, Pulse) + Send + 'static,
{
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let pulse = Pulse::default();
    let thread_pulse = pulse.clone();
    std::thread::Builder::new()
        .name(name.to_owned())
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || {
            let _notice = DeathNotice(thread_pulse.clone());
            let jobs = Jobs {
                rx,
                pulse: thread_pulse.clone(),
            };
            body(jobs, thread_pulse);
        })?;
    Ok((
        Queue {
            tx,
            pulse: pulse.clone(),
        },
        pulse,
    ))
}

/// How the [`watchdog`] judges a worker.
#[derive(Debug, Clone, Copy)]
pub struct WatchdogOptions {
    /// Work waiting or running with no progress for this long is a wedged worker.
    pub wedged_after: Duration,
    /// How long health stays NOT_SERVING before the process exits with
    /// [`WATCHDOG_EXIT_CODE`]; `None` never exits (tests, embedders that restart on their own).
    pub exit_after: Option<Duration>,
    /// How often the pulse is read.
    pub check_every: Duration,
}

impl Default for WatchdogOptions {
    fn default() -> Self {
        Self {
            wedged_after: Duration::from_secs(120),
            exit_after: Some(Duration::from_secs(30)),
            check_every: Duration::from_millis(500),
        }
    }
}

/// The watchdog's flags, flattened into the command lines of the services with a model
/// thread (generator, vision).
#[derive(Debug, Clone, clap::Args)]
pub struct WatchdogArgs {
    /// Seconds the model thread may hold work without progress before health reports
    /// NOT_SERVING (a wedged worker).
    #[arg(long, env = "MEDGEMMA_WORKER_WEDGED_AFTER_S", default_value_t = 120)]
    pub worker_wedged_after_s: u64,
    /// Seconds health stays NOT_SERVING for a dead or wedged model thread before the process
    /// exits non-zero (70) for its orchestrator to restart it.
    #[arg(long, env = "MEDGEMMA_WATCHDOG_GRACE_S", default_value_t = 30)]
    pub watchdog_grace_s: u64,
}

impl WatchdogArgs {
    /// The watchdog these flags describe.
    pub fn options(&self) -> WatchdogOptions {
        WatchdogOptions {
            wedged_after: Duration::from_secs(self.worker_wedged_after_s),
            exit_after: Some(Duration::from_secs(self.watchdog_grace_s)),
            ..WatchdogOptions::default()
        }
    }
}

/// The exit status of a process whose worker died or stayed wedged (EX_SOFTWARE).
pub const WATCHDOG_EXIT_CODE: i32 = 70;

/// Watches `pulse` until the process ends: a dead or wedged worker turns `health`
/// NOT_SERVING; a wedged one that moves again turns it back SERVING; one that stays bad for
/// `exit_after` ends the process with [`WATCHDOG_EXIT_CODE`]. Run it on its own task once the
/// service is SERVING. It ends when the server begins its shutdown: a worker that stops with
/// its server is not a broken one.
pub async fn watchdog(health: Health, pulse: Pulse, options: WatchdogOptions) {
    let mut bad_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(options.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if health.is_stopping() {
            return;
        }
        match pulse.state(options.wedged_after) {
            WorkerState::Healthy => {
                if bad_since.take().is_some() {
                    tracing::warn!("worker moving again; health: serving");
                    health.set_serving().await;
                }
            }
            state => {
                let since = match bad_since {
                    Some(since) => since,
                    None => {
                        tracing::error!(?state, "worker dead or wedged; health: not serving");
                        health.set_not_serving().await;
                        *bad_since.insert(Instant::now())
                    }
                };
                if let Some(grace) = options.exit_after
                    && since.elapsed() >= grace
                {
                    tracing::error!(
                        ?state,
                        grace_s = grace.as_secs_f64(),
                        "worker still dead or wedged after the grace period; exiting"
                    );
                    std::process::exit(WATCHDOG_EXIT_CODE);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_panics_and_the_thread_goes_on() {
        let (queue, pulse) = spawn("test-worker", 2, |mut jobs: Jobs<u32>, pulse| {
            while let Some(j) = jobs.recv() {
                let _ = pulse.guard(|| assert!(j != 13, "unlucky"));
            }
        })
        .unwrap();
        for j in [1, 13, 2] {
            while let Err((SendError::Full, _)) = queue.try_send(j) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let t = Instant::now();
        while pulse.pending() > 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(pulse.panics(), 1);
        assert!(pulse.is_alive());
        assert_eq!(pulse.state(Duration::from_secs(1)), WorkerState::Healthy);
        drop(queue);
        let t = Instant::now();
        while pulse.is_alive() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(pulse.state(Duration::from_secs(1)), WorkerState::Dead);
    }

    #[test]
    fn a_stuck_unit_is_wedged_and_a_full_queue_refuses() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (queue, pulse) = spawn("test-worker", 1, move |mut jobs: Jobs<()>, pulse| {
            while jobs.recv().is_some() {
                let _ = pulse.guard(|| released.recv());
            }
        })
        .unwrap();
        queue.try_send(()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        queue.try_send(()).unwrap();
        assert_eq!(queue.try_send(()).unwrap_err().0, SendError::Full);
        assert!(matches!(
            pulse.state(Duration::from_millis(20)),
            WorkerState::Wedged(_)
        ));
        assert_eq!(pulse.state(Duration::from_secs(60)), WorkerState::Healthy);
        release.send(()).unwrap();
        release.send(()).unwrap();
    }
}
