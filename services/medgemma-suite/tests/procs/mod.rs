//! The service binaries as separate processes, for the tests that need real processes (traces
//! across them, killing a replica, SIGTERM drains). `cargo build --bins` puts the binaries in
//! the target directory; [`bin_path`] finds them there.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A service binary running as its own process; killed (SIGKILL) when dropped, so a failing
/// test leaves nothing behind.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    /// Where it serves gRPC (its `listening on` line).
    pub addr: SocketAddr,
    /// Where it serves `/metrics`, when started with `--metrics-addr`.
    pub metrics: Option<SocketAddr>,
    /// Everything it wrote to stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM (drain, flush the exporter), then wait for the exit.
    pub fn terminate(&mut self) {
        self.signal("TERM");
        if self.wait_exit(Duration::from_secs(30)).is_none() {
            panic!("{} did not exit after SIGTERM", self.name);
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The `/metrics` address; panics when started without `--metrics-addr`.
    pub fn metrics(&self) -> SocketAddr {
        self.metrics.expect("started with --metrics-addr")
    }

    /// Its stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

/// Where `cargo build` put the binaries: `$CARGO_TARGET_DIR/debug` (scripts/test.sh sets it;
/// a separate Cargo `build-dir` keeps the test's own executable elsewhere), else beside the
/// test (target/debug/deps/<test> -> target/debug).
pub fn bin_path(bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let beside = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let from_env = std::env::var_os("CARGO_TARGET_DIR").map(|d| PathBuf::from(d).join("debug"));
    from_env
        .into_iter()
        .chain([beside])
        .map(|d| d.join(bin))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{bin} is missing: build the service binaries first (cargo build --bins)")
        })
}

/// Starts `bin` with `args` and `envs` (two CPU threads), and waits for its `listening on`
/// line (and its `metrics listening on` line when `args` has `--metrics-addr`).
pub fn spawn(bin: &'static str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let path = bin_path(bin);
    let mut child = Command::new(&path)
        .args(args)
        .envs(envs.iter().copied())
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().unwrap();
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let want_metrics = args.contains(&"--metrics-addr");
    let (mut addr, mut metrics) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(180);
    while addr.is_none() || (want_metrics && metrics.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "{bin} did not say where it listens; stderr:\n{}",
                stderr.lock().unwrap()
            )
        });
        let a = line.rsplit(' ').next().and_then(|a| a.parse().ok());
        if line.contains("metrics listening on") {
            metrics = a;
        } else if line.contains("listening on") {
            addr = a;
        }
    }
    Proc {
        name: bin,
        child,
        addr: addr.unwrap(),
        metrics,
        stderr,
    }
}
