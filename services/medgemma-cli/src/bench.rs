//! `medgemma bench`: prefill and decode tokens/s at batch 1, printed beside llama.cpp's
//! `llama-bench` on the same GGUF in the same run when llama.cpp is present.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use medgemma_model::{Gemma3, KvCacheConfig, LogitsRows, ModelDType, SeqInput};

/// Flags of `medgemma bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The model (default: the demo GGUF in the cache).
    #[arg(long, env = "MEDGEMMA_MODEL")]
    pub model: Option<PathBuf>,
    /// Prompt length of the prefill test (llama-bench -p).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens of the decode test (llama-bench -n).
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Repetitions of each test; the table shows the mean.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Run the GGUF dequantized to f32.
    #[arg(long)]
    pub dequantize: bool,
    /// Path to llama.cpp's llama-bench (default: `llama-bench` on PATH); skipped if absent.
    #[arg(long, env = "MEDGEMMA_LLAMA_BENCH")]
    pub llama_bench: Option<PathBuf>,
    /// Print the table as JSON too.
    #[arg(long)]
    pub json: bool,
}

struct Row {
    engine: String,
    test: String,
    tok_s: f64,
    stddev: f64,
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, v.sqrt())
}

/// `medgemma bench`: load, time ours, run the peer, print the table.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let model_path = a
        .model
        .clone()
        .unwrap_or_else(|| medgemma_assets::demo_paths().gguf);
    if !model_path.exists() {
        bail!(
            "{} does not exist (run `medgemma fetch-demo` or pass --model)",
            model_path.display()
        );
    }
    let threads = candle_core::utils::get_num_threads();
    let opts =
        crate::generate::load_options(Some(ModelDType::F32), "cpu", None, a.dequantize, None)?;
    let model = Gemma3::load(&model_path, &opts)?;
    let prompt = bench_prompt(model.config().text.vocab_size as u32, a.prompt_tokens);
    let (pp, tg) = time_ours(&model, &prompt, &a)?;
    let mut rows = Vec::new();
    for (test, samples) in [
        (format!("pp{}", a.prompt_tokens), &pp),
        (format!("tg{}", a.gen_tokens), &tg),
    ] {
        let (tok_s, stddev) = mean_sd(samples);
        rows.push(Row {
            engine: "medgemma".into(),
            test,
            tok_s,
            stddev,
        });
    }
    let llama = a.llama_bench.clone().or_else(|| which("llama-bench"));
    let mut llama_cmd = None;
    if let Some(lb) = llama.filter(|p| p.exists()) {
        let (peer_rows, cmdline) = run_llama_bench(&lb, &model_path, threads, &a)?;
        rows.extend(peer_rows);
        llama_cmd = Some(cmdline);
    }
    println!(
        "model: {} ({} threads, {})",
        model_path.display(),
        threads,
        if a.dequantize {
            "dequantized f32"
        } else {
            "quantized"
        }
    );
    print_table(&rows, llama_cmd.as_deref(), threads, a.json);
    Ok(())
}

/// A deterministic pseudo-random prompt of `n` tokens, like llama-bench's random tokens.
fn bench_prompt(vocab: u32, n: usize) -> Vec<u32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1000 + (x % u64::from(vocab - 2000)) as u32
        })
        .collect()
}

/// One forward of `tokens` for the sequence `s`, the last row's logits.
fn forward_last(
    model: &Gemma3,
    kv: &mut medgemma_model::KvCache,
    s: &mut medgemma_model::SequenceKv,
    tokens: &[u32],
) -> anyhow::Result<Option<candle_core::Tensor>> {
    let mut out = model.forward(
        kv,
        &mut [SeqInput {
            kv: s,
            tokens,
            image_embeds: None,
            logits: LogitsRows::Last,
        }],
    )?;
    Ok(out.swap_remove(0))
}

/// Our prefill and decode tokens/s, one sample per repetition, after a warm-up.
fn time_ours(
    model: &Gemma3,
    prompt: &[u32],
    a: &BenchArgs,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut kv = model.new_kv_cache(KvCacheConfig::default());
    // Warm-up.
    let mut s = kv.new_sequence();
    forward_last(model, &mut kv, &mut s, &prompt[..prompt.len().min(16)])?;
    kv.release(&mut s);
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..a.reps {
        let mut s = kv.new_sequence();
        let t0 = Instant::now();
        forward_last(model, &mut kv, &mut s, prompt)?;
        pp.push(prompt.len() as f64 / t0.elapsed().as_secs_f64());
        kv.release(&mut s);
        // Decode from an empty context, as llama-bench's tg test does.
        let mut s = kv.new_sequence();
        let mut tok = 2u32;
        let t0 = Instant::now();
        for _ in 0..a.gen_tokens {
            let row: Vec<f32> = forward_last(model, &mut kv, &mut s, &[tok])?
                .context("no logits")?
                .squeeze(0)?
                .to_vec1()?;
            tok = row
                .iter()
                .enumerate()
                .fold(
                    (0usize, f32::MIN),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0 as u32;
        }
        tg.push(a.gen_tokens as f64 / t0.elapsed().as_secs_f64());
        kv.release(&mut s);
    }
    Ok((pp, tg))
}

/// llama.cpp's `llama-bench` on the same model and settings: its rows and the command line
/// (no rows when it failed).
fn run_llama_bench(
    lb: &std::path::Path,
    model_path: &std::path::Path,
    threads: usize,
    a: &BenchArgs,
) -> anyhow::Result<(Vec<Row>, String)> {
    let args = vec![
        "-m".to_string(),
        model_path.display().to_string(),
        "-t".into(),
        threads.to_string(),
        "-p".into(),
        a.prompt_tokens.to_string(),
        "-n".into(),
        a.gen_tokens.to_string(),
        "-r".into(),
        a.reps.to_string(),
        "-o".into(),
        "json".into(),
    ];
    let cmdline = format!("{} {}", lb.display(), args.join(" "));
    let out = Command::new(lb)
        .args(&args)
        .output()
        .with_context(|| format!("running {cmdline}"))?;
    let mut rows = Vec::new();
    if !out.status.success() {
        eprintln!(
            "llama-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok((rows, cmdline));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing llama-bench JSON")?;
    for r in v.as_array().into_iter().flatten() {
        let np = r["n_prompt"].as_u64().unwrap_or(0);
        let ng = r["n_gen"].as_u64().unwrap_or(0);
        let test = if np > 0 {
            format!("pp{np}")
        } else {
            format!("tg{ng}")
        };
        rows.push(Row {
            engine: "llama.cpp".into(),
            test,
            tok_s: r["avg_ts"].as_f64().unwrap_or(0.0),
            stddev: r["stddev_ts"].as_f64().unwrap_or(0.0),
        });
    }
    Ok((rows, cmdline))
}

/// The table (ours beside llama.cpp, with the ratio), the peer's command, and JSON if asked.
fn print_table(rows: &[Row], llama_cmd: Option<&str>, threads: usize, json: bool) {
    println!("| engine    | test  |      tok/s |   ± | vs llama.cpp |");
    println!("|-----------|-------|-----------:|----:|-------------:|");
    let mut json_rows = Vec::new();
    for r in rows {
        let peer = rows
            .iter()
            .find(|p| p.engine == "llama.cpp" && p.test == r.test)
            .map(|p| p.tok_s);
        let ratio = match (r.engine.as_str(), peer) {
            ("medgemma", Some(p)) if p > 0.0 => format!("{:.2}x", r.tok_s / p),
            _ => "".into(),
        };
        println!(
            "| {:<9} | {:<5} | {:>10.1} | {:>3.0} | {:>12} |",
            r.engine, r.test, r.tok_s, r.stddev, ratio
        );
        json_rows.push(serde_json::json!({"engine": r.engine, "test": r.test, "tok_s": r.tok_s, "stddev": r.stddev}));
    }
    match llama_cmd {
        Some(c) => println!("llama.cpp command: {c}"),
        None => println!(
            "llama.cpp: not found (pass --llama-bench PATH; see tools/llama-cpp/README.md)"
        ),
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"threads": threads, "rows": json_rows, "llama_cpp_command": llama_cmd})
        );
    }
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}
