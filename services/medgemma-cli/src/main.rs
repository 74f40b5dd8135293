//! `medgemma`: the command-line entry point of medgemma-serve.
//!
//! Subcommands: `fetch-demo` (download and checksum the embedded demo model and tokenizer),
//! `fetch-model` (download a Hugging Face model repository, checksummed and resumable),
//! `generate` (run a prompt through a Gemma 3 / MedGemma model), `bench` (prefill and decode
//! speed beside llama.cpp), the gateway's clients `ask`, `summarize`, `mcq`, `report`,
//! `deidentify`, and `eval-deid` (de-identification scored beside Presidio).
//! Logs go to stderr; `--json` output goes to stdout.

mod bench;
mod bench_device;
mod bench_gateway;
mod bench_serve;
mod bench_vision;
mod client;
mod eval_deid;
mod fetch_model;
mod generate;
mod llama_server;
mod otlp_sink;
mod up;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed pages for reuse: the vision tower's per-layer activations (up to
/// 70 MB each) would otherwise be fresh `mmap`s that the kernel zero-fills on every layer.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "medgemma",
    version,
    about = "Serve Google's MedGemma models (Gemma 3) on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download and checksum the demo model (gemma-3-270m Q4_K_M GGUF) and the Gemma 3 tokenizer.
    FetchDemo(FetchDemoArgs),
    /// Generate text from a prompt with a Gemma 3 / MedGemma model.
    Generate(Box<generate::GenerateArgs>),
    /// Measure prefill and decode tokens/s at batch 1, beside llama.cpp when it is present.
    Bench(bench::BenchArgs),
    /// The generator under load: throughput, TTFT, TPOT and ITL at several concurrency levels,
    /// and TTFT of a shared prompt prefix with prefix caching on and off.
    BenchServe(bench_serve::BenchServeArgs),
    /// Ask the gateway a medical question (`ClinicalTasks.Ask`).
    Ask(client::AskArgs),
    /// Summarize a clinical note into typed fields (`ClinicalTasks.SummarizeClinicalNote`).
    Summarize(client::SummarizeArgs),
    /// Answer a multiple-choice question (`ClinicalTasks.AnswerMultipleChoice`).
    Mcq(client::McqArgs),
    /// Draft a radiology report for an image (`ClinicalTasks.DraftRadiologyReport`).
    Report(client::ReportArgs),
    /// The whole suite in one process on loopback (tokenizer, vision, generators, gateway),
    /// then each clinical task once through the gateway; serves until Ctrl-C / SIGTERM.
    Up(Box<up::UpArgs>),
    /// Images/s of the 4B vision tower (SigLIP so400m + projector, random weights in the real
    /// shapes) beside transformers on the same checkpoint.
    BenchVision(bench_vision::BenchVisionArgs),
    /// GPU: prefill/decode of a 4B-shaped random decoder at batch 1, 8, 64, the SigLIP tower,
    /// and the fraction of memory bandwidth decode achieves (tools/device/check.sh runs it).
    BenchDevice(Box<bench_device::BenchDeviceArgs>),
    /// Download a Hugging Face model repository (e.g. google/medgemma-4b-it) into a directory:
    /// HF_TOKEN for gated models, resumable, sha256-checked against the Hub's LFS metadata.
    FetchModel(fetch_model::FetchModelArgs),
    /// Score de-identification on the committed corpus (rules only, rules + model with
    /// `--gateway`), beside Presidio, and measure rules-only throughput.
    EvalDeid(eval_deid::EvalDeidArgs),
    /// De-identify a clinical note (`ClinicalTasks.Deidentify`).
    Deidentify(eval_deid::DeidentifyArgs),
    /// Make a gateway API key: the key on stdout (give it to the caller), the keys-file entry
    /// holding only its SHA-256 on stderr.
    GenApiKey(client::GenApiKeyArgs),
}

#[derive(Debug, clap::Args)]
struct FetchDemoArgs {
    /// Cache directory (default ~/.cache/medgemma).
    #[arg(long, env = "MEDGEMMA_CACHE_DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// Only print where the assets are (or would be), one `name<TAB>path` per line.
    #[arg(long)]
    print_paths: bool,
    /// Re-hash files already present even when they were verified before.
    #[arg(long)]
    verify: bool,
}

fn main() {
    medgemma_rpc::pin_thread_count();
    let cli = Cli::parse();
    // `up` and `bench-serve` start their own telemetry (logs, traces) inside their runtime.
    if !matches!(cli.command, Command::Up(_) | Command::BenchServe(_)) {
        medgemma_rpc::init_logging("warn");
    }
    let res = match cli.command {
        Command::FetchDemo(a) => fetch_demo(a),
        Command::Generate(a) => generate::run(*a),
        Command::Bench(a) => bench::run(a),
        Command::BenchServe(a) => bench_serve::run(a),
        Command::Ask(a) => client::ask(a),
        Command::Summarize(a) => client::summarize(a),
        Command::Mcq(a) => client::mcq(a),
        Command::Report(a) => client::report(a),
        Command::Up(a) => up::run(*a),
        Command::BenchVision(a) => bench_vision::run(a),
        Command::BenchDevice(a) => bench_device::run(*a),
        Command::FetchModel(a) => fetch_model::run(a),
        Command::EvalDeid(a) => eval_deid::run(a),
        Command::Deidentify(a) => eval_deid::deidentify(a),
        Command::GenApiKey(a) => client::gen_api_key(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn fetch_demo(a: FetchDemoArgs) -> anyhow::Result<()> {
    let cache = a
        .cache_dir
        .clone()
        .unwrap_or_else(medgemma_assets::cache_dir);
    if a.print_paths {
        let p = medgemma_assets::DemoPaths::under(&cache);
        println!("gguf\t{}", p.gguf.display());
        println!("tokenizer_json\t{}", p.tokenizer_json.display());
        println!("tokenizer_config\t{}", p.tokenizer_config.display());
        return Ok(());
    }
    let opts = medgemma_assets::FetchOptions {
        cache_dir: Some(cache),
        progress: true,
        verify_existing: a.verify,
    };
    let p = medgemma_assets::fetch_demo(&opts)?;
    println!("gguf\t{}", p.gguf.display());
    println!("tokenizer_json\t{}", p.tokenizer_json.display());
    println!("tokenizer_config\t{}", p.tokenizer_config.display());
    Ok(())
}
