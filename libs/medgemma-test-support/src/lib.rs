//! Test scaffolding shared by the workspace's tests (a dev-dependency only, never in a
//! binary): the repository's `fixtures/` paths, golden files, `max_abs_diff`, the gating of
//! tests that need the fetched demo assets, and (feature `server`) in-process gRPC servers.
//!
//! Helpers panic with the path or the reason on failure: they only ever run inside tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medgemma_assets::{DemoPaths, GGUF_FILE_NAME, demo_paths};
use serde_json::Value;

/// The repository root (this crate lives in `libs/medgemma-test-support`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `fixtures/<rel>` in the repository.
pub fn fixture(rel: impl AsRef<Path>) -> PathBuf {
    repo_root().join("fixtures").join(rel)
}

/// The bytes of `fixtures/images/<name>`: the images and DICOM objects that tests of several
/// crates send (made by `tools/fixtures/vision_reference.py`).
pub fn image(name: &str) -> Vec<u8> {
    read(fixture("images").join(name))
}

/// The bytes of `path`, or a panic naming it.
pub fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `path` parsed as JSON, or a panic naming it.
pub fn read_json(path: impl AsRef<Path>) -> Value {
    let path = path.as_ref();
    serde_json::from_slice(&read(path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A reference model's goldens: `fixtures/<model>/golden.json` (the cases, as written by
/// `tools/fixtures/`) and `fixtures/<model>/golden.safetensors` (the tensors, when present).
pub struct Golden {
    pub cases: Vec<Value>,
    pub tensors: HashMap<String, Tensor>,
}

impl Golden {
    /// The case called `name`.
    pub fn case(&self, name: &str) -> &Value {
        self.cases
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no golden case {name:?}"))
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("no golden tensor {name:?}"))
    }
}

/// The goldens of the reference model `fixtures/<model>`.
pub fn golden(model: &str) -> Golden {
    let json = read_json(fixture(model).join("golden.json"));
    let cases = json["cases"].as_array().cloned().unwrap_or_default();
    let st = fixture(model).join("golden.safetensors");
    let tensors = if st.exists() {
        candle_core::safetensors::load(&st, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", st.display()))
    } else {
        HashMap::new()
    };
    Golden { cases, tensors }
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array of ids: {v}"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("an id")).expect("a u32 id"))
        .collect()
}

/// The largest |a - b| over two tensors of one shape, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("to f32");
    (f32(a) - f32(b))
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("max |a - b|")
}

/// The largest |a - b| over two slices of one length.
pub fn max_abs_diff_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The demo paths when all three files exist, for tests that need the real model.
///
/// When they are missing: with `MEDGEMMA_REQUIRE_ASSETS=1` (what `scripts/test.sh` sets) this
/// panics, the intended test failure telling to run `medgemma fetch-demo`; otherwise it prints
/// a skip note and returns `None`.
pub fn demo_assets() -> Option<DemoPaths> {
    let paths = demo_paths();
    if paths.all_exist() {
        return Some(paths);
    }
    let required = std::env::var("MEDGEMMA_REQUIRE_ASSETS").is_ok_and(|v| v.trim() == "1");
    let msg = format!(
        "demo assets missing under {} (need {}, {} and {}); run `medgemma fetch-demo` \
         (or set MEDGEMMA_CACHE_DIR to a cache that has them)",
        paths
            .gguf
            .parent()
            .map_or_else(|| paths.gguf.display(), |p| p.display()),
        GGUF_FILE_NAME,
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    );
    if required {
        panic!("MEDGEMMA_REQUIRE_ASSETS=1 but {msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// Child processes for tests that need their own environment (setting variables inside a
/// threaded test process is unsound): a test re-runs itself, the child takes the other role.
pub mod child {
    use std::process::{Command, Output};

    const CHILD: &str = "MEDGEMMA_TEST_CHILD";

    /// Runs `work` and returns true when this process is the child that [`run`] started for
    /// the test `name`; false in the parent, which then runs children and asserts on them.
    pub fn role(name: &str, work: impl FnOnce()) -> bool {
        if std::env::var(CHILD).as_deref() == Ok(name) {
            work();
            true
        } else {
            false
        }
    }

    /// Runs the test `name` of this test binary alone in a child process with `env` set
    /// (and `MEDGEMMA_REQUIRE_ASSETS` unset unless `env` sets it).
    pub fn run(name: &str, env: &[(&str, &str)]) -> Output {
        let exe = std::env::current_exe().expect("the test binary");
        let mut cmd = Command::new(exe);
        cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, name)
            .env_remove("MEDGEMMA_REQUIRE_ASSETS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run the child test")
    }

    /// Status, stdout and stderr of a child, for assertion messages.
    pub fn text(o: &Output) -> String {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

/// In-process gRPC servers (feature `server`): a service started on a free loopback port with
/// a channel to it, shut down gracefully when the handle is dropped.
#[cfg(feature = "server")]
pub mod server {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;

    use tokio::sync::oneshot;
    use tonic::transport::Channel;

    /// The shutdown future a service's `serve` takes; it completes when the [`InProcess`]
    /// handle is stopped or dropped.
    pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    /// A server a test started in this process on `127.0.0.1` (a free port), with a channel to
    /// it. Dropping the handle begins the server's graceful shutdown.
    pub struct InProcess<R> {
        /// What the service's `serve` returned.
        pub running: R,
        /// Where it listens.
        pub addr: SocketAddr,
        /// A connected channel to it.
        pub channel: Channel,
        stop: Option<oneshot::Sender<()>>,
    }

    impl<R> InProcess<R> {
        /// Begins the server's graceful shutdown now (as dropping the handle does); `running`
        /// stays available, to wait for the end.
        pub fn stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    impl<R> Drop for InProcess<R> {
        fn drop(&mut self) {
            self.stop();
        }
    }

    /// Starts a server: `serve` gets the address to listen on (`127.0.0.1:0`) and the shutdown
    /// future, and returns the running server, whose bound address `addr` reads. Panics (it
    /// runs in tests) when the server does not start or cannot be reached.
    pub async fn start<R, E, Fut>(
        serve: impl FnOnce(&'static str, Shutdown) -> Fut,
        addr: impl FnOnce(&R) -> SocketAddr,
    ) -> InProcess<R>
    where
        Fut: Future<Output = Result<R, E>>,
        E: std::fmt::Debug,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let running = serve("127.0.0.1:0", shutdown)
            .await
            .unwrap_or_else(|e| panic!("the server did not start: {e:?}"));
        let addr = addr(&running);
        let channel = medgemma_rpc::client::connect(&addr.to_string())
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e:?}"));
        InProcess {
            running,
            addr,
            channel,
            stop: Some(stop),
        }
    }

    /// Serves `routes` on an [`medgemma_rpc::RpcServer`] (default options; health SERVING for
    /// the whole server and for `services`): for a test's own implementation of a service, such
    /// as a recorder in front of the real one.
    pub async fn start_routes(
        routes: tonic::service::Routes,
        services: &[&str],
    ) -> InProcess<medgemma_rpc::Running> {
        start(
            |listen, shutdown| async move {
                let server = medgemma_rpc::RpcServer::bind_with(
                    listen,
                    services,
                    medgemma_rpc::ServeOptions::default(),
                )
                .await?;
                let running = server.spawn(routes, shutdown);
                running.health.set_serving().await;
                Ok::<_, medgemma_rpc::RpcError>(running)
            },
            |r| r.local_addr,
        )
        .await
    }
}
