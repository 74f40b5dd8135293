//! `medgemma up`: the whole suite in one process on loopback — tokenizer, vision, a text and a
//! multimodal generator, and the gateway, each a real gRPC server on its own port built from
//! the service crates — then each of the four tasks once through the gateway over gRPC, then
//! serving until Ctrl-C or SIGTERM.
//!
//! Both generator pools run the demo decoder (sharing its weights, each with its own KV cache
//! and model thread); the multimodal one is paired with a seeded *random* SigLIP tower sized to
//! the decoder, so report texts exercise the whole image path but describe nothing real.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use medgemma_proto::gateway::v1 as pb;
use medgemma_suite::{Suite, SuiteOptions};

use crate::client;

/// A chest radiograph (NEMA WG04 RG1, JPEG 2000 DICOM, from pydicom-data, MIT) for the demo
/// report, from the repository's fixtures/ (the vision crate's tests decode it too).
const DEMO_IMAGE: &[u8] = include_bytes!("../../../fixtures/images/RG1_J2KI.dcm");

/// The demo's clinical note, from the MedGemma field report our users start from.
const DEMO_NOTE: &str = "病患,65 歲男性,主訴胸悶及呼吸困難三天,昨夜症狀加劇。體檢:血壓 155/95 mmHg,\
心率 88 次/分,SpO2 94%。胸部 X 光顯示輕度肺水腫跡象。BNP 升高至 450 pg/mL。\
診斷:急性心臟衰竭急性發作(HFrEF)。處置:給予靜脈注射利尿劑,低鹽飲食衛教。安排心臟科門診追蹤。";

/// How long everything may take to stop after Ctrl-C / SIGTERM (the issue asks for 10 s).
const STOP_BOUND: Duration = Duration::from_secs(9);

/// Flags of `medgemma up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The gateway's address (`127.0.0.1:0` picks a free port).
    #[arg(
        long,
        env = "MEDGEMMA_GATEWAY_LISTEN",
        default_value = "127.0.0.1:50050"
    )]
    pub gateway_listen: String,
    /// The host the other services bind, each on a free port.
    #[arg(long, env = "MEDGEMMA_UP_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Exit after the demo: status 0 only if all four tasks answered.
    #[arg(long, env = "MEDGEMMA_UP_ONCE")]
    pub once: bool,
    /// Skip the demo requests (just serve).
    #[arg(long, env = "MEDGEMMA_UP_NO_DEMO", conflicts_with = "once")]
    pub no_demo: bool,
    /// Token budget of each demo task.
    #[arg(long, env = "MEDGEMMA_DEMO_MAX_NEW_TOKENS", default_value_t = 48)]
    pub demo_max_new_tokens: u32,
    /// The cache root for the demo assets (default ~/.cache/medgemma).
    #[arg(long, env = "MEDGEMMA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The disclaimer every response carries.
    #[arg(long, env = "MEDGEMMA_DISCLAIMER", default_value = medgemma_gateway::prompt::DEFAULT_DISCLAIMER)]
    pub disclaimer: String,
    /// Requests each generator lets wait beyond its running ones; one more gets
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MEDGEMMA_QUEUE_CAPACITY", default_value_t = 16)]
    pub queue_capacity: usize,
    /// Sequences each generator runs at once (continuous batching).
    #[arg(long, env = "MEDGEMMA_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Metrics (one endpoint for the four services), log format, content logging.
    #[command(flatten)]
    pub common: medgemma_rpc::CommonArgs,
    /// TLS on every hop with a throwaway CA generated now: the backends require the gateway's
    /// client certificate (mTLS); the CA is written to --tls-dir for clients (`--ca`).
    #[arg(long, env = "MEDGEMMA_UP_TLS")]
    pub tls: bool,
    /// Where `--tls` writes its CA, certificate and key (default: a new directory under the
    /// system's temporary directory).
    #[arg(long, env = "MEDGEMMA_UP_TLS_DIR", requires = "tls")]
    pub tls_dir: Option<PathBuf>,
}

/// `--tls`: a new CA and one loopback certificate (server and client use), written to a
/// directory; returns the suite's files and the CA path for clients.
fn dev_tls(dir: Option<&PathBuf>) -> anyhow::Result<(medgemma_suite::SuiteTls, PathBuf)> {
    let dir = match dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("medgemma-up-tls-{}", std::process::id())),
    };
    let ca = medgemma_rpc::tls::DevCa::new("medgemma up throwaway CA")?;
    let (server, client) = ca.write_loopback_set(&dir)?;
    let ca_path = client.ca.clone();
    Ok((medgemma_suite::SuiteTls { server, client }, ca_path))
}

fn say_listening(name: &str, addr: SocketAddr, note: &str) {
    if note.is_empty() {
        println!("{name} listening on {addr}");
    } else {
        println!("{name} listening on {addr} ({note})");
    }
}

/// `medgemma up`.
pub fn run(a: UpArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let ok = rt.block_on(up(a))?;
    // Model threads and blocking tasks must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    if !ok {
        anyhow::bail!("a demo task failed");
    }
    Ok(())
}

async fn up(a: UpArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    // Each in-process service exports its spans under its own service.name.
    let telemetry = medgemma_rpc::telemetry::init_suite("medgemma-up", "warn", &a.common).await?;
    if let Some(addr) = telemetry.metrics_addr {
        println!("metrics listening on {addr}");
    }
    eprintln!(
        "loading the demo model (gemma-3-270m), the Gemma 3 tokenizer and the demo vision tower..."
    );
    let tls = a.tls.then(|| dev_tls(a.tls_dir.as_ref())).transpose()?;
    let suite = Suite::start(SuiteOptions {
        host: a.host.clone(),
        gateway_listen: a.gateway_listen.clone(),
        cache_dir: a.cache_dir.clone(),
        fetch: true,
        text_replicas: 1,
        disclaimer: a.disclaimer.clone(),
        drain_timeout: Duration::from_secs(8),
        queue_capacity: a.queue_capacity,
        max_running: a.max_running,
        tls: tls.as_ref().map(|(t, _)| t.clone()),
    })
    .await
    .context("starting the suite")?;
    say_listening("tokenizer", suite.tokenizer.addr, "");
    say_listening(
        "vision",
        suite.vision.addr,
        "demo SigLIP tower with RANDOM weights",
    );
    for g in &suite.text {
        say_listening("generator", g.server.addr, "text pool, demo decoder");
    }
    say_listening(
        "generator",
        suite.multimodal.server.addr,
        "multimodal pool, demo decoder + random vision tower",
    );
    say_listening("gateway", suite.gateway.addr, "");
    eprintln!(
        "note: the vision tower is RANDOM (seeded, sized to the demo decoder): radiology reports \
         run the whole image path but describe nothing in the image. The demo decoder is a small \
         base model: its answers are not medical advice, nor good."
    );
    let gateway_addr = suite.gateway.addr;
    let ca_flag = match &tls {
        Some((_, ca)) => {
            eprintln!(
                "tls: every hop is TLS, the backends require the gateway's client certificate \
                 (mTLS); throwaway CA: {}",
                ca.display()
            );
            format!(" --ca {}", ca.display())
        }
        None => String::new(),
    };
    eprintln!(
        "all services up in {:.1} s; try: medgemma ask --gateway {gateway_addr}{ca_flag} --question \"...\"",
        started.elapsed().as_secs_f64()
    );

    let mut ok = true;
    if !a.no_demo {
        let client_tls = match &tls {
            Some((t, _)) => Some(medgemma_rpc::tls::ClientTls::load(
                medgemma_rpc::tls::ClientTlsFiles {
                    ca: t.client.ca.clone(),
                    identity: None,
                },
                Duration::from_secs(60),
            )?),
            None => None,
        };
        ok = run_demo(gateway_addr, client_tls.as_ref(), a.demo_max_new_tokens).await;
        println!("demo done");
    }
    if !a.once {
        eprintln!("serving; Ctrl-C or SIGTERM stops");
        medgemma_rpc::shutdown_signal().await;
    }
    for e in suite.stop(STOP_BOUND).await {
        eprintln!("shutdown: {e}");
    }
    telemetry.shutdown();
    Ok(ok)
}

async fn run_demo(
    gateway: SocketAddr,
    tls: Option<&medgemma_rpc::tls::ClientTls>,
    max_new_tokens: u32,
) -> bool {
    let sampling = Some(pb::Sampling {
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    });
    let mut c = match client::connect(&gateway.to_string(), tls, client::ApiKey::default()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo: {e:#}");
            return false;
        }
    };
    let timeout = Duration::from_secs(300);

    let mut ok = true;
    let mut report = |name: &str, r: Result<String, tonic::Status>| match r {
        Ok(text) => println!("== {name}\n{text}\n"),
        Err(s) => {
            ok = false;
            println!("== {name}\nFAILED: {:?}: {}\n", s.code(), s.message());
        }
    };

    println!("\n== demo: the four tasks through the gateway at {gateway}\n");
    let r = c
        .ask(client::request(
            pb::AskRequest {
                question: "What are the first-line treatments for Type 2 diabetes?".into(),
                system: None,
                sampling,
            },
            timeout,
        ))
        .await
        .map(|r| client::ask_text(r.get_ref()));
    report("Ask", r);

    let r = c
        .summarize_clinical_note(client::request(
            pb::SummarizeClinicalNoteRequest {
                note: DEMO_NOTE.into(),
                output_language: None,
                sampling,
            },
            timeout,
        ))
        .await
        .map(|r| client::summary_text(r.get_ref()));
    report("SummarizeClinicalNote", r);

    let options: Vec<String> = ["Warfarin", "Aspirin", "Heparin", "Clopidogrel alone"]
        .into_iter()
        .map(String::from)
        .collect();
    let r = c
        .answer_multiple_choice(client::request(
            pb::AnswerMultipleChoiceRequest {
                question: "下列哪種藥物是治療急性心肌梗塞的首選抗血小板藥物?".into(),
                options: options.clone(),
                sampling,
            },
            timeout,
        ))
        .await
        .map(|r| client::mcq_text(r.get_ref(), &options));
    report("AnswerMultipleChoice", r);

    let r = c
        .draft_radiology_report(client::request(
            pb::DraftRadiologyReportRequest {
                image: Some(pb::Image {
                    data: DEMO_IMAGE.to_vec(),
                    mime_type: "application/dicom".into(),
                }),
                modality: "PA chest X-ray".into(),
                body_part: "chest".into(),
                sampling,
            },
            timeout,
        ))
        .await
        .map(|r| client::report_text(r.get_ref()));
    report("DraftRadiologyReport", r);
    ok
}
