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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    medgemma_rpc::init_logging("info");
    let cli = Cli::parse();
    // The disclaimer is configuration, not a secret; pools are addresses.
    tracing::info!(config = ?cli.args, "starting");
    let gw = GatewayServer::bind(cli.args).await?;
    println!("gateway listening on {}", gw.local_addr());
    gw.serve(medgemma_rpc::shutdown_signal()).await?;
    Ok(())
}
