//! `medgemma ask | summarize | mcq | report`: clients of the gateway's typed task API, printing
//! the typed response (or one JSON object with `--json`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use medgemma_proto::gateway::v1 as pb;
use pb::clinical_tasks_client::ClinicalTasksClient;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Where the gateway is and how to talk to it.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The gateway, `host:port` or `http://host:port`.
    #[arg(long, env = "MEDGEMMA_GATEWAY", default_value = "127.0.0.1:50050")]
    pub gateway: String,
    /// Give up after this long (`30s`, `2m`); sent as the call's deadline.
    #[arg(long, env = "MEDGEMMA_CLIENT_TIMEOUT", default_value = "5m", value_parser = medgemma_gateway::pool::parse_duration)]
    pub timeout: Duration,
    /// Print text as it is generated, then the typed result.
    #[arg(long)]
    pub stream: bool,
    /// Print the response as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// PEM CA certificate of the gateway's certificate: turns on TLS.
    #[arg(long, env = "MEDGEMMA_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (a gateway that requires mTLS), with --key.
    #[arg(long, env = "MEDGEMMA_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "MEDGEMMA_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// A file holding the API key, sent as `authorization: Bearer <key>` (or set
    /// MEDGEMMA_API_KEY; never pass a key on the command line).
    #[arg(long, env = "MEDGEMMA_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
}

/// A gateway client that sends the API key (if any) with every call.
pub type GatewayClient = ClinicalTasksClient<InterceptedService<Channel, ApiKey>>;

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone, Default)]
pub struct ApiKey(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ApiKey(set)"
        } else {
            "ApiKey(none)"
        })
    }
}

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl ConnectArgs {
    /// The API key from --api-key-file or MEDGEMMA_API_KEY.
    fn api_key(&self) -> anyhow::Result<ApiKey> {
        match &self.api_key_file {
            Some(path) => ApiKey::new(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("reading the API key file {}", path.display()))?,
            ),
            None => ApiKey::from_env(),
        }
    }
}

impl ApiKey {
    /// The key in MEDGEMMA_API_KEY, if set.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::new(&std::env::var("MEDGEMMA_API_KEY").unwrap_or_default())
    }

    /// `key` (surrounding whitespace trimmed; empty: no key).
    fn new(key: &str) -> anyhow::Result<Self> {
        let key = key.trim();
        if key.is_empty() {
            return Ok(ApiKey(None));
        }
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {key}")
                .parse()
                .map_err(|_| anyhow::anyhow!("the API key holds characters a header cannot"))?;
        value.set_sensitive(true);
        Ok(ApiKey(Some(value)))
    }
}

/// Sampling overrides; unset flags take the task's defaults (temperature 0.1).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SamplingArgs {
    /// Sampling temperature (0 is greedy).
    #[arg(long, allow_hyphen_values = true)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<u32>,
    /// The most tokens to generate.
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// Sampler seed.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The request's `sampling`.
    pub fn to_proto(&self) -> Option<pb::Sampling> {
        Some(pb::Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        })
    }
}

/// Flags of `medgemma ask`.
#[derive(Debug, clap::Args)]
pub struct AskArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The question.
    #[arg(long)]
    pub question: String,
    /// A system instruction (default: the medical-assistant one; "" for none).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Flags of `medgemma summarize`.
#[derive(Debug, clap::Args)]
pub struct SummarizeArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The clinical note.
    #[arg(
        long,
        required_unless_present = "note_file",
        conflicts_with = "note_file"
    )]
    pub note: Option<String>,
    /// Read the note from this file (`-` for stdin).
    #[arg(long)]
    pub note_file: Option<PathBuf>,
    /// BCP 47 tag of the summary's language (default zh-TW).
    #[arg(long)]
    pub language: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Flags of `medgemma mcq`.
#[derive(Debug, clap::Args)]
pub struct McqArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The question.
    #[arg(long)]
    pub question: String,
    /// One option (repeat, 2 to 10, in order: A, B, ...).
    #[arg(long = "option")]
    pub options: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Flags of `medgemma report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The image: PNG, JPEG, WebP, TIFF or DICOM.
    #[arg(long)]
    pub image: PathBuf,
    /// Its media type (default: sniffed by the service).
    #[arg(long, default_value = "")]
    pub mime_type: String,
    /// The modality (`CR`, `CT`, `PA chest X-ray`, ...).
    #[arg(long, default_value = "")]
    pub modality: String,
    /// The body part (`chest`, ...).
    #[arg(long, default_value = "")]
    pub body_part: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// A client of the gateway at `addr` (`host:port` or a URL), over TLS with `tls`, sending
/// `key` with every call.
pub async fn connect(
    addr: &str,
    tls: Option<&medgemma_rpc::tls::ClientTls>,
    key: ApiKey,
) -> anyhow::Result<GatewayClient> {
    // The scheme stays http: TLS is our connector's, not tonic's.
    let url = match addr.split_once("://") {
        Some((_, rest)) => format!("http://{rest}"),
        None => format!("http://{addr}"),
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("{addr:?} is not a gateway address (host:port)"))?
        .connect_timeout(Duration::from_secs(10));
    let channel = medgemma_rpc::tls::connect(endpoint, tls, None)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to the gateway at {addr}: {}",
                error_chain(&*e)
            )
        })?;
    Ok(medgemma_rpc::with_limits!(
        ClinicalTasksClient::with_interceptor(channel, key)
    ))
}

/// A client of the gateway these flags name (TLS, client certificate, API key).
pub async fn connect_with(c: &ConnectArgs) -> anyhow::Result<GatewayClient> {
    let tls = medgemma_rpc::tls::ClientTls::from_options(
        c.ca.as_deref(),
        c.cert.as_deref(),
        c.key.as_deref(),
        Duration::from_secs(60),
    )?;
    connect(&c.gateway, tls.as_ref(), c.api_key()?).await
}

/// An error and its causes on one line (TLS refusals are in the causes).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

pub fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    // A BadRequest's message already lists its field violations.
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn print_delta(t: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(t.as_bytes());
    let _ = out.flush();
}

/// Runs a unary or streaming call; `$stream` yields messages with `event` = `TextDelta` or
/// `Response`.
macro_rules! call {
    ($client:expr, $c:expr, $req:expr, $unary:ident, $streaming:ident, $event:path) => {{
        use $event as Event;
        let req = request($req, $c.timeout);
        if $c.stream && !$c.json {
            let mut s = $client
                .$streaming(req)
                .await
                .map_err(status_error)?
                .into_inner();
            let mut last = None;
            while let Some(m) = s.message().await.map_err(status_error)? {
                match m.event {
                    Some(Event::TextDelta(t)) => print_delta(&t),
                    Some(Event::Response(r)) => last = Some(r),
                    None => {}
                }
            }
            println!("\n");
            last.ok_or_else(|| anyhow::anyhow!("the stream ended without a response"))?
        } else {
            $client
                .$unary(req)
                .await
                .map_err(status_error)?
                .into_inner()
        }
    }};
}

fn finish_name(f: i32) -> &'static str {
    match pb::FinishReason::try_from(f) {
        Ok(pb::FinishReason::Stop) => "stop",
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::Cancelled) => "cancelled",
        Ok(pb::FinishReason::Unspecified) | Err(_) => "unspecified",
    }
}

/// The fields every task response carries (flat in each response message).
trait Meta {
    fn model_id(&self) -> &str;
    fn usage(&self) -> pb::Usage;
    fn finish_reason(&self) -> i32;
    fn timings(&self) -> pb::Timings;
    fn disclaimer(&self) -> &str;
}

macro_rules! impl_meta {
    ($($t:ty),*) => {$(
        impl Meta for $t {
            fn model_id(&self) -> &str {
                &self.model_id
            }
            fn usage(&self) -> pb::Usage {
                self.usage.unwrap_or_default()
            }
            fn finish_reason(&self) -> i32 {
                self.finish_reason
            }
            fn timings(&self) -> pb::Timings {
                self.timings.unwrap_or_default()
            }
            fn disclaimer(&self) -> &str {
                &self.disclaimer
            }
        }
    )*};
}

impl_meta!(
    pb::AskResponse,
    pb::SummarizeClinicalNoteResponse,
    pb::AnswerMultipleChoiceResponse,
    pb::DraftRadiologyReportResponse
);

fn meta_json(r: &impl Meta) -> Value {
    let (u, t) = (r.usage(), r.timings());
    json!({
        "model_id": r.model_id(),
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens},
        "finish_reason": finish_name(r.finish_reason()),
        "timings": {
            "queue_ms": t.queue_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms,
            "vision_ms": t.vision_ms, "total_ms": t.total_ms,
        },
        "disclaimer": r.disclaimer(),
    })
}

fn meta_line(r: &impl Meta) -> String {
    let (u, t) = (r.usage(), r.timings());
    format!(
        "[model {} | {} prompt + {} completion tokens | finish: {} | {:.0} ms]\n\
         Disclaimer: {}",
        r.model_id(),
        u.prompt_tokens,
        u.completion_tokens,
        finish_name(r.finish_reason()),
        t.total_ms,
        r.disclaimer()
    )
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// `Ask` as JSON.
pub fn ask_json(r: &pb::AskResponse) -> Value {
    merge(json!({"answer": r.answer}), meta_json(r))
}

/// `Ask` for people.
pub fn ask_text(r: &pb::AskResponse) -> String {
    format!("Answer: {}\n{}", r.answer, meta_line(r))
}

/// `SummarizeClinicalNote` as JSON.
pub fn summary_json(r: &pb::SummarizeClinicalNoteResponse) -> Value {
    merge(
        json!({
            "chief_complaint": r.chief_complaint,
            "diagnoses": r.diagnoses,
            "treatment_plan": r.treatment_plan,
            "follow_up": r.follow_up,
            "text": r.text,
            "output_language": r.output_language,
        }),
        meta_json(r),
    )
}

/// `SummarizeClinicalNote` for people.
pub fn summary_text(r: &pb::SummarizeClinicalNoteResponse) -> String {
    format!(
        "Summary ({}):\n  chief_complaint: {}\n  diagnoses: {:?}\n  treatment_plan: {}\n  follow_up: {}\n{}",
        r.output_language,
        r.chief_complaint,
        r.diagnoses,
        r.treatment_plan,
        r.follow_up,
        meta_line(r)
    )
}

/// `AnswerMultipleChoice` as JSON.
pub fn mcq_json(r: &pb::AnswerMultipleChoiceResponse) -> Value {
    merge(
        json!({
            "chosen_index": r.chosen_index,
            "chosen_letter": r.chosen_letter,
            "explanation": r.explanation,
            "option_probabilities": r.option_probabilities,
        }),
        meta_json(r),
    )
}

/// `AnswerMultipleChoice` for people.
pub fn mcq_text(r: &pb::AnswerMultipleChoiceResponse, options: &[String]) -> String {
    let probs: Vec<String> = r
        .option_probabilities
        .iter()
        .zip(medgemma_gateway::prompt::OPTION_LETTERS)
        .map(|(p, l)| format!("{l} {p:.3}"))
        .collect();
    let chosen = options
        .get(r.chosen_index as usize)
        .map(String::as_str)
        .unwrap_or("?");
    format!(
        "Answer: {} ({chosen})\n  probabilities: {}\n  explanation: {}\n{}",
        r.chosen_letter,
        probs.join(", "),
        r.explanation,
        meta_line(r)
    )
}

/// `DraftRadiologyReport` as JSON.
pub fn report_json(r: &pb::DraftRadiologyReportResponse) -> Value {
    merge(
        json!({
            "technique": r.technique,
            "findings": r.findings,
            "impression": r.impression,
            "requires_physician_review": r.requires_physician_review,
        }),
        meta_json(r),
    )
}

/// `DraftRadiologyReport` for people.
pub fn report_text(r: &pb::DraftRadiologyReportResponse) -> String {
    let t = r.timings.unwrap_or_default();
    format!(
        "Radiology report draft:\n  TECHNIQUE: {}\n  FINDINGS: {}\n  IMPRESSION: {}\n  requires_physician_review: {}\n  (vision {:.0} ms)\n{}",
        r.technique,
        r.findings,
        r.impression,
        r.requires_physician_review,
        t.vision_ms,
        meta_line(r)
    )
}

fn print(json: bool, v: Value, text: String) {
    if json {
        println!("{v}");
    } else {
        println!("{text}");
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `medgemma ask`.
pub fn ask(a: AskArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect_with(&a.connect).await?;
        let req = pb::AskRequest {
            question: a.question,
            system: a.system,
            sampling: a.sampling.to_proto(),
        };
        let r = call!(
            client,
            a.connect,
            req,
            ask,
            ask_stream,
            pb::ask_stream_response::Event
        );
        print(a.connect.json, ask_json(&r), ask_text(&r));
        Ok(())
    })
}

/// `medgemma summarize`.
pub fn summarize(a: SummarizeArgs) -> anyhow::Result<()> {
    let note = match (a.note, &a.note_file) {
        (Some(n), _) => n,
        (None, Some(p)) if p.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading the note from stdin")?
        }
        (None, Some(p)) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the note from {}", p.display()))?,
        (None, None) => bail!("give --note or --note-file"),
    };
    runtime()?.block_on(async {
        let mut client = connect_with(&a.connect).await?;
        let req = pb::SummarizeClinicalNoteRequest {
            note,
            output_language: a.language,
            sampling: a.sampling.to_proto(),
        };
        let r = call!(
            client,
            a.connect,
            req,
            summarize_clinical_note,
            summarize_clinical_note_stream,
            pb::summarize_clinical_note_stream_response::Event
        );
        print(a.connect.json, summary_json(&r), summary_text(&r));
        Ok(())
    })
}

/// `medgemma mcq`.
pub fn mcq(a: McqArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect_with(&a.connect).await?;
        let req = pb::AnswerMultipleChoiceRequest {
            question: a.question,
            options: a.options.clone(),
            sampling: a.sampling.to_proto(),
        };
        let r = call!(
            client,
            a.connect,
            req,
            answer_multiple_choice,
            answer_multiple_choice_stream,
            pb::answer_multiple_choice_stream_response::Event
        );
        print(a.connect.json, mcq_json(&r), mcq_text(&r, &a.options));
        Ok(())
    })
}

/// `medgemma report`.
pub fn report(a: ReportArgs) -> anyhow::Result<()> {
    let data = std::fs::read(&a.image)
        .with_context(|| format!("reading the image {}", a.image.display()))?;
    runtime()?.block_on(async {
        let mut client = connect_with(&a.connect).await?;
        let req = pb::DraftRadiologyReportRequest {
            image: Some(pb::Image {
                data,
                mime_type: a.mime_type,
            }),
            modality: a.modality,
            body_part: a.body_part,
            sampling: a.sampling.to_proto(),
        };
        let r = call!(
            client,
            a.connect,
            req,
            draft_radiology_report,
            draft_radiology_report_stream,
            pb::draft_radiology_report_stream_response::Event
        );
        print(a.connect.json, report_json(&r), report_text(&r));
        Ok(())
    })
}

/// Flags of `medgemma gen-api-key`.
#[derive(Debug, clap::Args)]
pub struct GenApiKeyArgs {
    /// The key's name (what the audit log records).
    #[arg(long)]
    pub name: String,
    /// A task the key may call (repeat; `*` for all): Ask, SummarizeClinicalNote,
    /// AnswerMultipleChoice, DraftRadiologyReport, Deidentify.
    #[arg(long = "task", required = true)]
    pub tasks: Vec<String>,
}

/// `medgemma gen-api-key`.
pub fn gen_api_key(a: GenApiKeyArgs) -> anyhow::Result<()> {
    use medgemma_gateway::auth;
    for t in &a.tasks {
        if t != "*" && !auth::TASKS.contains(&t.as_str()) {
            bail!(
                "unknown task {t:?} (one of {} or \"*\")",
                auth::TASKS.join(", ")
            );
        }
    }
    let key = auth::new_key();
    let entry = json!({"name": a.name, "sha256": auth::key_hash(&key), "tasks": a.tasks});
    eprintln!(
        "add to the keys file's \"keys\" list (the key itself is printed on stdout only):\n{entry}"
    );
    println!("{key}");
    Ok(())
}
