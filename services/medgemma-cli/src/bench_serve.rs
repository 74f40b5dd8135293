//! `medgemma bench-serve`: the generator under load, in the spirit of vLLM's `bench serve`.
//! N requests at each concurrency level, fixed prompt and output lengths (eos ignored), sent
//! over the generator's gRPC streaming API; request throughput, output tok/s, TTFT, TPOT and
//! ITL percentiles, the largest batch the generator ran, and peak RSS. When llama.cpp's
//! `llama-server` is present, the same requests (the same prompt token ids) go to it on the
//! same GGUF with the same threads, `--parallel` = concurrency, in the same run, and the table
//! shows both with ratios. A shared-prefix scenario (one clinical note summarized in several
//! languages) reports TTFT with prefix caching on and off, and a
//! gateway scenario compares `Ask` through the whole suite with the same prompt sent to the
//! generator directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use medgemma_generator::{GeneratorConfig, RunningGenerator};
use medgemma_model::{Gemma3, ModelDType};
use medgemma_proto::generation::v1 as pb;
use medgemma_proto::generation::v1::generator_client::GeneratorClient;
use medgemma_tokenizer::{ChatMessage, Tokenizer};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Flags of `medgemma bench-serve`.
#[derive(Debug, clap::Args)]
pub struct BenchServeArgs {
    /// The model (default: the demo GGUF in the cache).
    #[arg(long, env = "MEDGEMMA_MODEL")]
    pub model: Option<PathBuf>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16, 64])]
    pub concurrency: Vec<usize>,
    /// Requests per level (default: 2 x concurrency, at least 8).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Prompt length in tokens (random ids, distinct per request).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Output length in tokens (eos ignored).
    #[arg(long, default_value_t = 64)]
    pub output_tokens: u32,
    /// Requests of the shared-prefix scenario (0: skip it).
    #[arg(long, default_value_t = 8)]
    pub prefix_requests: usize,
    /// Requests of the gateway scenario, one at a time (0: skip it).
    #[arg(long, default_value_t = 8)]
    pub gateway_requests: usize,
    /// llama.cpp's llama-server (default: `llama-server` on PATH); skipped if absent.
    #[arg(long, env = "MEDGEMMA_LLAMA_SERVER")]
    pub llama_server: Option<PathBuf>,
    /// Print the results as one JSON object on stdout as well.
    #[arg(long)]
    pub json: bool,
    /// Export every span over OTLP/gRPC to a receiver inside this process, as to a collector,
    /// to measure what export costs (`scripts/bench-telemetry.sh` compares runs with and
    /// without it). Without it, as without `OTEL_EXPORTER_OTLP_ENDPOINT`, nothing is exported.
    #[arg(long)]
    pub otlp_sink: bool,
}

/// Per-level measurements.
#[derive(Debug, serde::Serialize)]
struct Level {
    concurrency: usize,
    requests: usize,
    failed: usize,
    seconds: f64,
    requests_per_s: f64,
    output_tokens_per_s: f64,
    ttft_ms_p50: f64,
    ttft_ms_p99: f64,
    tpot_ms_p50: f64,
    tpot_ms_p99: f64,
    itl_ms_p50: f64,
    itl_ms_p99: f64,
    max_batch: u32,
    peak_rss_mib: f64,
}

/// One request's timings as the client saw them.
pub(crate) struct Sample {
    pub ttft: Duration,
    pub e2e: Duration,
    pub itls: Vec<Duration>,
    pub tokens: usize,
}

pub(crate) fn percentile(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    xs[i]
}

/// Peak resident memory (`VmHWM`) of a process, `self` or a pid, in MiB.
pub(crate) fn peak_rss_mib(proc: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{proc}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Deterministic pseudo-random prompt ids (BOS first), distinct per `seed`.
fn random_prompt(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut p = vec![2];
    p.extend((1..n).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        1000 + (x % u64::from(vocab - 2000)) as u32
    }));
    p
}

async fn one(client: &mut GeneratorClient<Channel>, ids: Vec<u32>, out: u32) -> Option<Sample> {
    let req = pb::GenerateRequest {
        prompt_ids: ids,
        sampling: Some(pb::SamplingParams {
            max_new_tokens: Some(out),
            ..Default::default()
        }),
        ignore_eos: true,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut stream = client.generate_stream(req).await.ok()?.into_inner();
    let mut last = None;
    let mut ttft = None;
    let mut itls = Vec::new();
    let mut tokens = 0;
    while let Some(msg) = stream.next().await {
        match msg.ok()?.event {
            Some(pb::generate_stream_response::Event::Delta(d)) => {
                let now = Instant::now();
                tokens += d.token_ids.len();
                match last {
                    None => ttft = Some(now - t0),
                    Some(prev) => itls.push(now - prev),
                }
                last = Some(now);
            }
            Some(pb::generate_stream_response::Event::Response(_)) => {
                return Some(Sample {
                    ttft: ttft?,
                    e2e: t0.elapsed(),
                    itls,
                    tokens,
                });
            }
            None => {}
        }
    }
    None
}

async fn level(
    client: &GeneratorClient<Channel>,
    prompts: Arc<Vec<Vec<u32>>>,
    concurrency: usize,
    out: u32,
) -> (Vec<Sample>, usize, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (mut c, next, prompts) = (client.clone(), next.clone(), prompts.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut failed = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = prompts.get(i) else { break };
                match one(&mut c, p.clone(), out).await {
                    Some(s) => got.push(s),
                    None => failed += 1,
                }
            }
            (got, failed)
        }));
    }
    let mut samples = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (g, f) = t.await.expect("bench task");
        samples.extend(g);
        failed += f;
    }
    (samples, failed, t0.elapsed())
}

async fn start(
    model: Arc<Gemma3>,
    tokenizer: Arc<Tokenizer>,
    max_running: usize,
    prefix_caching: bool,
) -> anyhow::Result<(RunningGenerator, GeneratorClient<Channel>)> {
    let mut cfg = GeneratorConfig::new("bench");
    cfg.scheduler.max_running = max_running;
    cfg.scheduler.prefix_caching = prefix_caching;
    cfg.queue_capacity = max_running.max(16);
    let running = medgemma_generator::serve(cfg, "127.0.0.1:0", std::future::pending()).await?;
    running.start(model, tokenizer).await?;
    let addr: SocketAddr = running.local_addr;
    let ch = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .context("connecting to the generator")?;
    Ok((
        running,
        medgemma_rpc::with_limits!(GeneratorClient::new(ch)),
    ))
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: BenchServeArgs) -> anyhow::Result<()> {
    let sink = a.otlp_sink.then(crate::otlp_sink::bind).transpose()?;
    let path = a
        .model
        .clone()
        .unwrap_or_else(|| medgemma_assets::demo_paths().gguf);
    if !path.exists() {
        bail!(
            "{} does not exist (run `medgemma fetch-demo` or pass --model)",
            path.display()
        );
    }
    let opts = crate::generate::load_options(Some(ModelDType::F32), "cpu", None, false, None)?;
    let model = Arc::new(Gemma3::load(&path, &opts)?);
    let tokenizer = Arc::new(if a.model.is_none() {
        Tokenizer::from_path(&medgemma_assets::demo_paths().tokenizer_dir)?
    } else {
        medgemma_generator::load_tokenizer(&path, None)?
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Telemetry as the services have it: W3C context on every hop, spans exported only
        // with an OTLP endpoint (set by --otlp-sink).
        let telemetry = medgemma_rpc::telemetry::init_suite(
            "medgemma-bench",
            "warn",
            &medgemma_rpc::CommonArgs::default(),
        )
        .await?;
        let counts = sink.map(crate::otlp_sink::Sink::serve).transpose()?;
        let result = bench(a, path, model, tokenizer).await;
        telemetry.shutdown();
        if let Some(c) = counts {
            // The batch exporter's last flush is in flight; give it a moment to land.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let (spans, exports) = c.get();
            println!(
                "OTLP export: {spans} spans in {exports} export calls reached the in-process sink"
            );
        }
        result
    })
}

/// The measurements of one level from its samples.
fn summarize(
    concurrency: usize,
    samples: &[Sample],
    failed: usize,
    elapsed: Duration,
    max_batch: u32,
    peak_rss_mib: f64,
) -> Level {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| ms(s.ttft)).collect();
    let mut tpot: Vec<f64> = samples
        .iter()
        .filter(|s| s.tokens > 1)
        .map(|s| ms(s.e2e - s.ttft) / (s.tokens - 1) as f64)
        .collect();
    let mut itl: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.itls.iter().map(|d| ms(*d)))
        .collect();
    let secs = elapsed.as_secs_f64();
    Level {
        concurrency,
        requests: samples.len(),
        failed,
        seconds: secs,
        requests_per_s: samples.len() as f64 / secs,
        output_tokens_per_s: tokens as f64 / secs,
        ttft_ms_p50: percentile(&mut ttft, 0.5),
        ttft_ms_p99: percentile(&mut ttft, 0.99),
        tpot_ms_p50: percentile(&mut tpot, 0.5),
        tpot_ms_p99: percentile(&mut tpot, 0.99),
        itl_ms_p50: percentile(&mut itl, 0.5),
        itl_ms_p99: percentile(&mut itl, 0.99),
        max_batch,
        peak_rss_mib,
    }
}

/// Every concurrency level against our generator (and llama-server, when present), then the
/// shared-prefix and gateway runs, then the table.
async fn bench(
    a: BenchServeArgs,
    path: PathBuf,
    model: Arc<Gemma3>,
    tokenizer: Arc<Tokenizer>,
) -> anyhow::Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let runs = levels(&a, &path, &model, &tokenizer, threads).await?;
    let prefix = if a.prefix_requests > 0 {
        Some(shared_prefix(&a, &model, &tokenizer).await?)
    } else {
        None
    };
    let gateway = if a.gateway_requests > 0 {
        Some(crate::bench_gateway::run(a.gateway_requests, a.output_tokens, &tokenizer).await?)
    } else {
        None
    };
    let Levels {
        ours,
        theirs,
        llama_cmd,
    } = &runs;
    print_table(&a, threads, &runs, prefix.as_ref(), gateway.as_ref());
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "medgemma": ours,
                "llama_server": theirs,
                "llama_server_command": llama_cmd,
                "shared_prefix": prefix,
                "gateway": gateway,
                "prompt_tokens": a.prompt_tokens,
                "output_tokens": a.output_tokens,
                "threads": threads,
            })
        );
    }
    Ok(())
}

/// The concurrency levels' results: ours, llama-server's (same order), its command line.
struct Levels {
    ours: Vec<Level>,
    theirs: Vec<Level>,
    llama_cmd: Option<String>,
}

/// Runs each `--concurrency` level against a generator started here, and the same prompts
/// against llama-server when it is present.
async fn levels(
    a: &BenchServeArgs,
    path: &std::path::Path,
    model: &Arc<Gemma3>,
    tokenizer: &Arc<Tokenizer>,
    threads: usize,
) -> anyhow::Result<Levels> {
    let vocab = model.config().text.vocab_size as u32;
    let max_c = a.concurrency.iter().copied().max().unwrap_or(1);
    let llama = a
        .llama_server
        .clone()
        .or_else(|| crate::bench::which("llama-server"))
        .filter(|p| p.exists());
    let (generator, client) = start(model.clone(), tokenizer.clone(), max_c, true).await?;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut llama_cmd = None;
    let mut seed = 0u64;
    for &c in &a.concurrency {
        let n = a.requests.unwrap_or((2 * c).max(8));
        let prompts: Arc<Vec<Vec<u32>>> = Arc::new(
            (0..n)
                .map(|_| {
                    seed += 1;
                    random_prompt(a.prompt_tokens, vocab, seed)
                })
                .collect(),
        );
        let (samples, failed, elapsed) = level(&client, prompts.clone(), c, a.output_tokens).await;
        let max_batch = stats(&client).await?.max_batch_size;
        ours.push(summarize(
            c,
            &samples,
            failed,
            elapsed,
            max_batch,
            peak_rss_mib("self"),
        ));
        if let Some(bin) = &llama {
            let ctx = c * (a.prompt_tokens + a.output_tokens as usize + 64);
            let (bin, path, prompts) = (bin.clone(), path.to_owned(), prompts.clone());
            let out = a.output_tokens;
            let (lv, cmd) = tokio::task::spawn_blocking(move || {
                crate::llama_server::run_level(&bin, &path, threads, c, ctx, &prompts, out)
            })
            .await??;
            theirs.push(summarize(
                c,
                &lv.samples,
                lv.failed,
                lv.elapsed,
                0,
                lv.peak_rss_mib,
            ));
            llama_cmd = Some(cmd);
        }
    }
    drop(client);
    drop(generator);
    Ok(Levels {
        ours,
        theirs,
        llama_cmd,
    })
}

/// The table of levels, ours beside llama-server's with the ratio, then the shared-prefix and
/// gateway lines.
fn print_table(
    a: &BenchServeArgs,
    threads: usize,
    runs: &Levels,
    prefix: Option<&PrefixResult>,
    gateway: Option<&crate::bench_gateway::GatewayResult>,
) {
    let Levels {
        ours,
        theirs,
        llama_cmd,
    } = runs;
    println!(
        "bench-serve: generator gRPC streaming, {} prompt tokens, {} output tokens (eos ignored), {threads} threads",
        a.prompt_tokens, a.output_tokens,
    );
    println!(
        "| engine | concurrency | requests | failed | req/s | output tok/s | vs llama-server | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | max batch | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, l) in ours.iter().enumerate() {
        let peer = theirs.get(i);
        let ratio = peer.map_or_else(String::new, |p| {
            format!("{:.2}x", l.output_tokens_per_s / p.output_tokens_per_s)
        });
        print_row("medgemma", l, &ratio, &l.max_batch.to_string());
        if let Some(p) = peer {
            print_row("llama-server", p, "", "-");
        }
    }
    match &llama_cmd {
        Some(c) => println!("llama-server command (per level): {c}"),
        None => println!(
            "llama-server: not found (pass --llama-server PATH; tools/llama-cpp/build.sh builds it)"
        ),
    }
    if let Some(p) = prefix {
        println!(
            "shared prefix ({} requests, {} shared of ~{} prompt tokens, one at a time): TTFT median {:.0} ms with prefix caching, {:.0} ms without ({:.1}x); {} prompt tokens served from the cache",
            p.requests,
            p.shared_tokens,
            p.prompt_tokens,
            p.ttft_ms_cached,
            p.ttft_ms_uncached,
            p.ttft_ms_uncached / p.ttft_ms_cached,
            p.hit_tokens
        );
    }
    if let Some(g) = gateway {
        println!("{g}");
    }
}

fn print_row(engine: &str, l: &Level, ratio: &str, max_batch: &str) {
    println!(
        "| {engine} | {} | {} | {} | {:.2} | {:.1} | {ratio} | {:.0} / {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {max_batch} | {:.0} |",
        l.concurrency,
        l.requests,
        l.failed,
        l.requests_per_s,
        l.output_tokens_per_s,
        l.ttft_ms_p50,
        l.ttft_ms_p99,
        l.tpot_ms_p50,
        l.tpot_ms_p99,
        l.itl_ms_p50,
        l.itl_ms_p99,
        l.peak_rss_mib
    );
}

async fn stats(client: &GeneratorClient<Channel>) -> anyhow::Result<pb::StatsResponse> {
    Ok(client
        .clone()
        .stats(pb::StatsRequest {})
        .await?
        .into_inner())
}

#[derive(Debug, serde::Serialize)]
struct PrefixResult {
    requests: usize,
    prompt_tokens: usize,
    shared_tokens: usize,
    ttft_ms_cached: f64,
    ttft_ms_uncached: f64,
    hit_tokens: u64,
}

/// A discharge summary (the repository's fixture), in the shared-prefix scenario.
const NOTE: &str = include_str!("../../../fixtures/medical_text.txt");

/// The summary task on one clinical note in several output languages (the system prompt, the
/// instructions and the note are shared; the language line at the end differs), sent one at a
/// time to a generator with prefix caching on, then to one with it off.
async fn shared_prefix(
    a: &BenchServeArgs,
    model: &Arc<Gemma3>,
    tokenizer: &Arc<Tokenizer>,
) -> anyhow::Result<PrefixResult> {
    let template = tokenizer
        .chat_template()
        .context("the tokenizer has no chat template")?;
    const LANGUAGES: [&str; 8] = ["en", "zh-TW", "ja", "ko", "fr", "de", "es", "it"];
    let prompts: Vec<Vec<u32>> = (0..a.prefix_requests)
        .map(|i| {
            let lang = LANGUAGES[i % LANGUAGES.len()];
            let msgs = [
                ChatMessage::system(medgemma_gateway::prompt::MEDICAL_SYSTEM_PROMPT),
                ChatMessage::user(medgemma_gateway::prompt::summarize(NOTE, lang)),
            ];
            let text = template.render(&msgs, true)?;
            Ok(tokenizer.encode(&text, false)?)
        })
        .collect::<anyhow::Result<_>>()?;
    let shared = prompts[0]
        .iter()
        .zip(prompts.get(1).unwrap_or(&prompts[0]))
        .take_while(|(x, y)| x == y)
        .count();
    let mut result = PrefixResult {
        requests: prompts.len(),
        prompt_tokens: prompts[0].len(),
        shared_tokens: shared,
        ttft_ms_cached: 0.0,
        ttft_ms_uncached: 0.0,
        hit_tokens: 0,
    };
    for caching in [true, false] {
        let (_gen, mut client) = start(model.clone(), tokenizer.clone(), 4, caching).await?;
        let mut ttft = Vec::new();
        for p in &prompts {
            let s = one(&mut client, p.clone(), 4)
                .await
                .context("a shared-prefix request failed")?;
            ttft.push(ms(s.ttft));
        }
        // The first request fills the cache; the rest are what caching changes.
        let median = percentile(&mut ttft[1..].to_vec(), 0.5);
        if caching {
            result.ttft_ms_cached = median;
            result.hit_tokens = stats(&client).await?.prefix_cache_hit_tokens;
        } else {
            result.ttft_ms_uncached = median;
        }
    }
    Ok(result)
}
