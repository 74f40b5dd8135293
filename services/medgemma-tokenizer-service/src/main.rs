//! `medgemma-tokenizer`: serves a Gemma 3 tokenizer and chat template over gRPC
//! (`medgemma.tokenizer.v1.Tokenizer`).

use clap::Parser;

/// Serve a MedGemma tokenizer and chat template over gRPC.
#[derive(Debug, Parser)]
#[command(name = "medgemma-tokenizer", version)]
struct Cli {
    #[command(flatten)]
    args: medgemma_tokenizer_service::TokenizerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    medgemma_rpc::init_logging("info");
    let cli = Cli::parse();
    let running =
        medgemma_tokenizer_service::launch(cli.args, medgemma_rpc::shutdown_signal()).await?;
    println!("tokenizer listening on {}", running.local_addr);
    running.server.await??;
    Ok(())
}
