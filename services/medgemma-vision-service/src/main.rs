//! `medgemma-vision`: serves a Gemma 3 vision tower over gRPC (`medgemma.vision.v1.VisionEncoder`).

use clap::Parser;

/// mimalloc reuses freed pages; glibc would `mmap` and zero-fill each large activation afresh
/// (the vision tower allocates ~280 MB per layer).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Encode medical images to MedGemma soft-token embeddings over gRPC.
#[derive(Debug, Parser)]
#[command(name = "medgemma-vision", version)]
struct Cli {
    #[command(flatten)]
    args: medgemma_vision_service::VisionArgs,
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
        medgemma_rpc::telemetry::init(medgemma_rpc::telemetry::VISION, "info", &cli.common).await?;
    if let Some(addr) = telemetry.metrics_addr {
        println!("vision metrics listening on {addr}");
    }
    tracing::info!(config = ?cli.args, "starting vision service");
    let running =
        medgemma_vision_service::launch(cli.args, medgemma_rpc::shutdown_signal()).await?;
    println!("vision listening on {}", running.local_addr);
    let served = running.server.await;
    telemetry.shutdown();
    served??;
    Ok(())
}
