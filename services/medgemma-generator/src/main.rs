//! `medgemma-generator`: serves one model over gRPC (`medgemma.generation.v1.Generator`).

use clap::Parser;

/// mimalloc reuses freed pages; glibc would `mmap` and zero-fill every allocation over its
/// threshold (prefill activations, logits) afresh on each request.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serve one MedGemma model for generation over gRPC.
#[derive(Debug, Parser)]
#[command(name = "medgemma-generator", version)]
struct Cli {
    #[command(flatten)]
    args: medgemma_generator::GeneratorArgs,
    /// Metrics, log format and content logging (tracing: the standard OTEL_* variables).
    #[command(flatten)]
    common: medgemma_rpc::CommonArgs,
}

fn main() -> anyhow::Result<()> {
    medgemma_rpc::run_pinned(run())?
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry =
        medgemma_rpc::telemetry::init(medgemma_rpc::telemetry::GENERATOR, "info", &cli.common)
            .await?;
    if let Some(addr) = telemetry.metrics_addr {
        println!("generator metrics listening on {addr}");
    }
    let running = medgemma_generator::launch(cli.args, medgemma_rpc::shutdown_signal(), |addr| {
        tracing::info!(%addr, "bound; loading the model");
    })
    .await?;
    println!("generator listening on {}", running.local_addr);
    let served = running.server.await;
    telemetry.shutdown();
    served??;
    Ok(())
}
