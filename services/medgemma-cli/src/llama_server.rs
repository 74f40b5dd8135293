//! llama.cpp's `llama-server` as the peer of `medgemma bench-serve`: started on the same GGUF
//! with the same threads and `--parallel` = concurrency (continuous batching on), driven with
//! the same prompt token ids through its `/completion` endpoint (streamed, `n_predict`,
//! `ignore_eos`, greedy, no prompt cache), timed as the client sees it, then stopped.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench_serve::Sample;

/// One level's samples as llama-server served them.
pub struct LlamaLevel {
    pub samples: Vec<Sample>,
    pub failed: usize,
    pub elapsed: Duration,
    pub peak_rss_mib: f64,
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts llama-server and waits until `/health` answers 200 (model loaded).
fn start(
    bin: &Path,
    gguf: &Path,
    threads: usize,
    parallel: usize,
    ctx: usize,
) -> anyhow::Result<(Server, String)> {
    let port = free_port()?;
    let args: Vec<String> = [
        "-m",
        &gguf.display().to_string(),
        "-t",
        &threads.to_string(),
        "--parallel",
        &parallel.to_string(),
        "-c",
        &ctx.to_string(),
        "--cont-batching",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cmd = format!("{} {}", bin.display(), args.join(" "));
    let child = Command::new(bin)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut server = Server { child, port };
    let agent = ureq::Agent::new_with_defaults();
    let t = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("llama-server exited during start-up ({status}): {cmd}");
        }
        let ok = agent
            .get(&format!("http://127.0.0.1:{port}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200);
        if ok {
            return Ok((server, cmd));
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("llama-server did not become healthy within 180 s: {cmd}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One streamed completion; `None` when it failed.
fn one(agent: &ureq::Agent, port: u16, ids: &[u32], out: u32) -> Option<Sample> {
    let body = serde_json::json!({
        "prompt": ids,
        "n_predict": out,
        "ignore_eos": true,
        "stream": true,
        "cache_prompt": false,
        "temperature": 0.0,
        "top_k": 1,
        "return_tokens": true,
    });
    let t0 = Instant::now();
    let resp = agent
        .post(&format!("http://127.0.0.1:{port}/completion"))
        .send_json(&body)
        .ok()?;
    let reader = BufReader::new(resp.into_body().into_reader());
    let (mut ttft, mut last) = (None, None);
    let mut itls = Vec::new();
    let mut tokens = 0usize;
    let mut predicted = None;
    for line in reader.lines() {
        let line = line.ok()?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let ev: serde_json::Value = serde_json::from_str(data).ok()?;
        let n = ev["tokens"].as_array().map_or_else(
            || usize::from(ev["content"].as_str().is_some_and(|c| !c.is_empty())),
            Vec::len,
        );
        if n > 0 {
            let now = Instant::now();
            match last {
                None => ttft = Some(now - t0),
                Some(prev) => itls.push(now - prev),
            }
            last = Some(now);
            tokens += n;
        }
        if ev["stop"].as_bool() == Some(true) {
            predicted = ev["timings"]["predicted_n"].as_u64();
            break;
        }
    }
    Some(Sample {
        ttft: ttft?,
        e2e: t0.elapsed(),
        itls,
        tokens: predicted.map_or(tokens, |p| p as usize),
    })
}

/// Serves `prompts` with `concurrency` client threads on a fresh llama-server; returns the
/// samples and the exact command it ran.
pub fn run_level(
    bin: &Path,
    gguf: &Path,
    threads: usize,
    concurrency: usize,
    ctx: usize,
    prompts: &Arc<Vec<Vec<u32>>>,
    out: u32,
) -> anyhow::Result<(LlamaLevel, String)> {
    let (server, cmd) = start(bin, gguf, threads, concurrency, ctx)?;
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, prompts, port) = (next.clone(), prompts.clone(), server.port);
            std::thread::spawn(move || {
                let agent = ureq::Agent::new_with_defaults();
                let mut got = Vec::new();
                let mut failed = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = prompts.get(i) else { break };
                    match one(&agent, port, p, out) {
                        Some(s) => got.push(s),
                        None => failed += 1,
                    }
                }
                (got, failed)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut failed = 0;
    for w in workers {
        let (g, f) = w
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        samples.extend(g);
        failed += f;
    }
    let elapsed = t0.elapsed();
    let peak_rss_mib = crate::bench_serve::peak_rss_mib(&server.child.id().to_string());
    drop(server);
    Ok((
        LlamaLevel {
            samples,
            failed,
            elapsed,
            peak_rss_mib,
        },
        cmd,
    ))
}
