//! `medgemma-tokenizer`: serves a Gemma 3 tokenizer and chat template over gRPC
//! (`medgemma.tokenizer.v1.Tokenizer`).

use clap::Parser;

/// Serve a MedGemma tokenizer and chat template over gRPC.
#[derive(Debug, Parser)]
#[command(name = "medgemma-tokenizer", version)]
struct Cli {
    #[command(flatten)]
    args: medgemma_tokenizer_service::TokenizerArgs,
    /// Metrics, log format and content logging (tracing: the standard OTEL_* variables).
    #[command(flatten)]
    common: medgemma_rpc::CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry =
        medgemma_rpc::telemetry::init(medgemma_rpc::telemetry::TOKENIZER, "info", &cli.common)
            .await?;
    if let Some(addr) = telemetry.metrics_addr {
        println!("tokenizer metrics listening on {addr}");
    }
    let running =
        medgemma_tokenizer_service::launch(cli.args, medgemma_rpc::shutdown_signal()).await?;
    println!("tokenizer listening on {}", running.local_addr);
    let served = running.server.await;
    telemetry.shutdown();
    served??;
    Ok(())
}
