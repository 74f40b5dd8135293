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
}

fn main() -> anyhow::Result<()> {
    medgemma_rpc::run_pinned(run())?
}

async fn run() -> anyhow::Result<()> {
    medgemma_rpc::init_logging("info");
    let cli = Cli::parse();
    let running = medgemma_generator::launch(cli.args, medgemma_rpc::shutdown_signal(), |addr| {
        tracing::info!(%addr, "bound; loading the model");
    })
    .await?;
    println!("generator listening on {}", running.local_addr);
    running.server.await??;
    Ok(())
}
