//! `medgemma bench-vision`: images/s of the MedGemma 4B vision path (SigLIP so400m at 896 px +
//! projector) on seeded random weights in the real shapes, beside transformers on the same
//! checkpoint in the same run, with a full-size parity check and the memory the forward pass
//! needs on top of the weights.
//!
//! tools/bench/vision_transformers.py makes the checkpoint (once) and times transformers;
//! this side loads the same files with our loader.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use medgemma_vision::VisionEncoder;

/// Flags of `medgemma bench-vision`.
#[derive(Debug, clap::Args)]
pub struct BenchVisionArgs {
    /// Python with torch + transformers (tools/fixtures/requirements.txt). Without it only our
    /// side runs, on a checkpoint that must already be in --dir.
    #[arg(long, env = "MEDGEMMA_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// Where the full-size random checkpoint lives (made on first use, ~1.7 GB).
    #[arg(long, default_value = "/tmp/medgemma-bench-so400m")]
    pub dir: PathBuf,
    /// Images timed per side (after one warm-up image).
    #[arg(long, default_value_t = 3)]
    pub images: usize,
    /// Print the table as JSON too.
    #[arg(long)]
    pub json: bool,
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the peak-RSS counter (Linux >= 4.0); false where not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// User + system CPU seconds of this process so far (/proc/self/stat), so a busy machine
/// shows up as wall time, not as a different ratio.
fn cpu_seconds() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

/// Our side's measurements.
struct Ours {
    threads: usize,
    images_per_s: f64,
    per_image: Vec<f64>,
    best: f64,
    cpu_per_image: f64,
    weight_bytes: f64,
    rss_start: u64,
    rss_loaded: u64,
    /// Peak RSS (VmHWM) after the timed forwards; only theirs when the peak could be reset.
    peak: u64,
    peak_ok: bool,
    load_s: f64,
    /// Max |ours - transformers| and max |transformers|, when a reference was saved.
    parity: Option<(f32, f32)>,
}

/// `medgemma bench-vision`: make the checkpoint (transformers side), time ours, check parity,
/// print the table.
pub fn run(a: BenchVisionArgs) -> anyhow::Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let peer = match &a.python {
        Some(py) => Some(run_transformers(py, &a, threads)?),
        None => None,
    };
    if !a.dir.join("model.safetensors").exists() {
        bail!(
            "{} holds no checkpoint: run once with --python (torch + transformers) to make it",
            a.dir.display()
        );
    }
    let ours = time_ours(&a, threads)?;
    print_table(&ours, peer.as_ref());
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "ours": {"images_per_s": ours.images_per_s, "cpu_seconds_per_image": ours.cpu_per_image, "threads": threads, "image_seconds": ours.per_image, "rss_before_load_bytes": ours.rss_start, "rss_after_load_bytes": ours.rss_loaded, "peak_rss_bytes": ours.peak},
                "transformers": peer,
                "parity_max_abs_diff": ours.parity.map(|p| p.0),
            })
        );
    }
    Ok(())
}

/// The transformers side (`tools/bench/vision_transformers.py`): makes the checkpoint and the
/// reference if missing, times itself, prints one JSON line.
fn run_transformers(
    py: &std::path::Path,
    a: &BenchVisionArgs,
    threads: usize,
) -> anyhow::Result<serde_json::Value> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench/vision_transformers.py");
    eprintln!("transformers: {} {}", py.display(), script.display());
    let out = Command::new(py)
        .arg(&script)
        .arg("--dir")
        .arg(&a.dir)
        .arg("--images")
        .arg(a.images.to_string())
        .arg("--threads")
        .arg(threads.to_string())
        .output()
        .with_context(|| format!("running {}", py.display()))?;
    if !out.status.success() {
        bail!(
            "the transformers side failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim().lines().last().unwrap_or(""))
        .context("the transformers side printed no JSON")
}

/// Loads our encoder, checks parity on the reference (or random pixels), times `a.images`
/// forwards.
fn time_ours(a: &BenchVisionArgs, threads: usize) -> anyhow::Result<Ours> {
    let rss_start = status_kib("VmRSS") * 1024;
    let t_load = Instant::now();
    let enc = VisionEncoder::load(&a.dir, &Device::Cpu, DType::F32)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let reference = a.dir.join("reference.safetensors");
    let (pixels, want) = if reference.exists() {
        let t = candle_core::safetensors::load(&reference, &Device::Cpu)?;
        (t["pixel_values"].clone(), Some(t["embeddings"].clone()))
    } else {
        (
            Tensor::rand(-1f32, 1f32, (1, 3, 896, 896), &Device::Cpu)?,
            None,
        )
    };
    let got = enc.encode_pixels(&pixels)?; // warm-up, and parity
    let parity = match &want {
        Some(w) => {
            let d = (got.get(0)? - w)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let scale = w.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            Some((d, scale))
        }
        None => None,
    };
    let rss_loaded = status_kib("VmRSS") * 1024;
    let peak_ok = reset_peak_rss();
    let t0 = Instant::now();
    let c0 = cpu_seconds();
    let mut per_image = Vec::with_capacity(a.images);
    for _ in 0..a.images {
        let t = Instant::now();
        enc.encode_pixels(&pixels)?;
        per_image.push(t.elapsed().as_secs_f64());
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(Ours {
        threads,
        images_per_s: a.images as f64 / secs,
        best: per_image.iter().copied().fold(f64::INFINITY, f64::min),
        per_image,
        cpu_per_image: (cpu_seconds() - c0) / a.images as f64,
        weight_bytes: enc.weight_bytes() as f64,
        rss_start,
        rss_loaded,
        peak: status_kib("VmHWM") * 1024,
        peak_ok,
        load_s,
        parity,
    })
}

/// The table (ours, then transformers with the speed ratios), memory and parity lines.
fn print_table(o: &Ours, peer: Option<&serde_json::Value>) {
    let (ours, best, cpu_per_image) = (o.images_per_s, o.best, o.cpu_per_image);
    println!(
        "| engine | images/s | s/image | fastest image, s | CPU s/image | weights | RSS after load | peak RSS in forward |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| medgemma-serve (candle, f32, {} threads) | {ours:.4} | {:.2} | {best:.2} | {cpu_per_image:.1} | {} | {} | {} |",
        o.threads,
        1.0 / ours,
        gib(o.weight_bytes),
        gib(o.rss_loaded as f64),
        if o.peak_ok {
            gib(o.peak as f64)
        } else {
            "n/a".into()
        },
    );
    if let Some(p) = peer {
        let ips = p["images_per_s"].as_f64().unwrap_or(0.0);
        let peer_cpu = p["cpu_seconds_per_image"].as_f64().unwrap_or(0.0);
        let peer_best = p["image_seconds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_f64())
            .fold(f64::INFINITY, f64::min);
        println!(
            "| {} ({} threads) | {ips:.4} | {:.2} | {peer_best:.2} | {peer_cpu:.1} | {} | {} | {} |",
            p["impl"].as_str().unwrap_or("transformers"),
            p["threads"],
            1.0 / ips,
            gib(p["weight_bytes"].as_f64().unwrap_or(0.0)),
            gib(p["rss_after_load_bytes"].as_f64().unwrap_or(0.0)),
            gib(p["peak_rss_bytes"].as_f64().unwrap_or(0.0)),
        );
        println!();
        println!(
            "speed ratio (ours / transformers): {:.2}x by wall time, {:.2}x by the fastest image, {:.2}x by CPU time",
            ours / ips,
            peer_best / best,
            peer_cpu / cpu_per_image.max(1e-9)
        );
    }
    if o.peak_ok {
        // Against the weights, not the RSS after load: the allocator keeps the pages freed
        // while loading (transposed copies), and reuses them in the forward pass.
        println!(
            "forward pass needs {} above the weights (peak RSS - weights - RSS before load; 4096 patches, 27 layers)",
            gib((o.peak as f64 - o.weight_bytes - o.rss_start as f64).max(0.0))
        );
    }
    if let Some((d, scale)) = o.parity {
        println!(
            "full-size parity: max |ours - transformers| = {d:.2e} over embeddings of max |x| = {scale:.2e}"
        );
    }
    println!("load: {:.1} s", o.load_s);
}
