//! `medgemma-gateway`: the typed clinical task API (`medgemma.gateway.v1.ClinicalTasks`).

use clap::Parser;
use medgemma_gateway::{GatewayArgs, GatewayServer};

#[derive(Debug, Parser)]
#[command(
    name = "medgemma-gateway",
    version,
    about = "Typed clinical task RPCs over the tokenizer, vision and generator pools"
)]
struct Cli {
    #[command(flatten)]
    args: GatewayArgs,
    /// Metrics, log format and content logging (tracing: the standard OTEL_* variables).
    #[command(flatten)]
    common: medgemma_rpc::CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry =
        medgemma_rpc::telemetry::init(medgemma_rpc::telemetry::GATEWAY, "info", &cli.common)
            .await?;
    if let Some(addr) = telemetry.metrics_addr {
        println!("gateway metrics listening on {addr}");
    }
    // The disclaimer is configuration, not a secret; pools are addresses.
    tracing::info!(config = ?cli.args, "starting");
    let gw = GatewayServer::bind(cli.args).await?;
    println!("gateway listening on {}", gw.local_addr());
    let served = gw.serve(medgemma_rpc::shutdown_signal()).await;
    telemetry.shutdown();
    served?;
    Ok(())
}
