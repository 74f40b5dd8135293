//! `medgemma eval-deid`: the de-identification detector scored on the committed corpus
//! (fixtures/deid), per type and overall, rules-only and (with `--gateway`) rules + model through
//! `ClinicalTasks/Deidentify`, beside Microsoft Presidio on the same English notes
//! (tools/deid/presidio_eval.py, which installs itself), and the rules-only throughput on one
//! core. `medgemma deidentify`: the client of `Deidentify`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use medgemma_deid::eval::{self, Counts, Note, Predicted, Report};
use medgemma_proto::gateway::v1 as pb;
use serde_json::{Value, json};

use crate::client::{ApiKey, ConnectArgs, SamplingArgs, connect, connect_with, request};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// Flags of `medgemma eval-deid`.
#[derive(Debug, clap::Args)]
pub struct EvalDeidArgs {
    /// The corpus directory (`dev.jsonl`, `test.jsonl`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/deid"))]
    pub corpus: PathBuf,
    /// Which split: `test` (held out), `dev`, or `all`.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// At most this many notes per language (a fast subset).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also score rules + model through this gateway's `Deidentify`.
    #[arg(long)]
    pub gateway: Option<String>,
    /// With `--gateway`: how many notes are in flight at once (the generator batches them).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Skip Presidio.
    #[arg(long)]
    pub no_presidio: bool,
    /// The Python that runs tools/deid/presidio_eval.py (it makes its own venv).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Megabytes of notes for the rules-only throughput measurement (0: skip).
    #[arg(long, default_value_t = 4.0)]
    pub bench_mb: f64,
    /// Fail unless rules-only token recall is at least this.
    #[arg(long)]
    pub min_recall: Option<f64>,
    /// Fail unless rules-only precision is at least this.
    #[arg(long)]
    pub min_precision: Option<f64>,
    /// Fail unless rules-only token recall on the English notes beats Presidio's by this much.
    #[arg(long)]
    pub min_margin: Option<f64>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.3}")
    }
}

fn row(name: &str, c: &Counts) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} |",
        c.gold_spans,
        pct(c.span_recall()),
        pct(c.token_recall()),
        pct(c.precision()),
        pct(c.f1()),
        pct(c.leak_rate())
    )
}

fn table(title: &str, r: &Report) -> String {
    let mut s = format!(
        "\n{title} ({} notes)\n\n| type | gold spans | span recall | token recall | precision | F1 | leak rate |\n|---|---:|---:|---:|---:|---:|---:|\n",
        r.notes
    );
    for (t, c) in &r.per_type {
        if c.gold_spans > 0 {
            s.push_str(&row(t, c));
            s.push('\n');
        }
    }
    s.push_str(&row("**overall**", &r.overall));
    s.push('\n');
    s
}

fn counts_json(c: &Counts) -> Value {
    json!({
        "gold_spans": c.gold_spans, "span_recall": c.span_recall(), "token_recall": c.token_recall(),
        "precision": c.precision(), "f1": c.f1(), "leak_rate": c.leak_rate(),
    })
}

fn report_json(r: &Report) -> Value {
    json!({
        "notes": r.notes,
        "overall": counts_json(&r.overall),
        "per_type": r.per_type.iter().map(|(t, c)| (t.clone(), counts_json(c))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Presidio's predictions for `notes` (by note id), and its configuration.
fn presidio(
    python: &str,
    notes: &[&Note],
) -> anyhow::Result<(HashMap<String, Vec<Predicted>>, Value)> {
    let script = PathBuf::from(REPO).join("tools/deid/presidio_eval.py");
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {} {}", python, script.display()))?;
    let mut input = String::new();
    for n in notes {
        input.push_str(&json!({"id": n.id, "text": n.text}).to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().context("presidio stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().context("waiting for presidio")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread"))??;
    if !out.status.success() {
        bail!("presidio_eval.py failed ({})", out.status);
    }
    let mut config = Value::Null;
    let mut preds = HashMap::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let v: Value = serde_json::from_str(line).context("presidio output")?;
        if let Some(c) = v.get("config") {
            config = c.clone();
            continue;
        }
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        let spans = v["spans"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| Predicted {
                        start: s["start"].as_u64().unwrap_or(0) as usize,
                        end: s["end"].as_u64().unwrap_or(0) as usize,
                        ty: s["type"].as_str().unwrap_or("?").to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        preds.insert(id, spans);
    }
    Ok((preds, config))
}

fn throughput(notes: &[Note], mb: f64) -> (f64, usize) {
    let total: usize = notes.iter().map(|n| n.text.len()).sum();
    let target = (mb * 1e6) as usize;
    let mut bytes = 0;
    let t = Instant::now();
    'outer: loop {
        for n in notes {
            std::hint::black_box(medgemma_deid::detect(std::hint::black_box(&n.text)));
            bytes += n.text.len();
            if bytes >= target && bytes >= total {
                break 'outer;
            }
        }
    }
    (bytes as f64 / 1e6 / t.elapsed().as_secs_f64(), bytes)
}

/// What `eval-deid` measured.
struct Results {
    /// Rules only, every note and the English ones.
    rules: Report,
    rules_en: Report,
    /// Rules + model through a gateway (every note, English ones, the model id).
    model: Option<(Report, Report, String)>,
    /// Presidio on the English notes, and its configuration.
    presidio_out: Option<(Report, Value)>,
    /// Rules-only throughput (MB/s, bytes).
    bench: Option<(f64, usize)>,
}

/// `medgemma eval-deid`: corpus, rules, Presidio, gateway, then the tables and the gates.
pub fn run(a: EvalDeidArgs) -> anyhow::Result<()> {
    let notes = load_notes(&a)?;
    let english: Vec<&Note> = notes.iter().filter(|n| n.lang == "en").collect();
    let rules = eval::evaluate(&notes, eval::rules_only);
    let rules_en = eval::evaluate(english.iter().copied(), eval::rules_only);

    let mut model: Option<(Report, Report, String)> = None;
    if let Some(gw) = &a.gateway {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let (preds, model_id) = rt.block_on(model_pass(gw, &notes, a.concurrency.max(1)))?;
        let get = |n: &Note| preds.get(&n.id).cloned().unwrap_or_default();
        model = Some((
            eval::evaluate(&notes, get),
            eval::evaluate(english.iter().copied(), get),
            model_id,
        ));
    }

    let mut presidio_out: Option<(Report, Value)> = None;
    if !a.no_presidio {
        let (preds, config) = presidio(&a.python, &english)?;
        let r = eval::evaluate(english.iter().copied(), |n| {
            preds.get(&n.id).cloned().unwrap_or_default()
        });
        presidio_out = Some((r, config));
    }

    let results = Results {
        rules,
        rules_en,
        model,
        presidio_out,
        bench: (a.bench_mb > 0.0).then(|| throughput(&notes, a.bench_mb)),
    };
    if a.json {
        print_json(&a, &results);
    } else {
        print_tables(&a, english.len(), &results)?;
    }
    check_gates(&a, &results)
}

/// The notes of `--split`, at most `--limit` per language.
fn load_notes(a: &EvalDeidArgs) -> anyhow::Result<Vec<Note>> {
    let files: &[&str] = match a.split.as_str() {
        "test" => &["test"],
        "dev" => &["dev"],
        "all" => &["dev", "test"],
        other => bail!("--split must be test, dev or all, not {other:?}"),
    };
    let mut notes = Vec::new();
    for f in files {
        let mut split = eval::load(&a.corpus.join(format!("{f}.jsonl")))?;
        if let Some(limit) = a.limit {
            let mut per_lang: HashMap<String, usize> = HashMap::new();
            split.retain(|n| {
                let c = per_lang.entry(n.lang.clone()).or_default();
                *c += 1;
                *c <= limit
            });
        }
        notes.extend(split);
    }
    Ok(notes)
}

fn print_json(a: &EvalDeidArgs, r: &Results) {
    let (model, presidio_out) = (&r.model, &r.presidio_out);
    println!(
        "{}",
        json!({
            "split": a.split,
            "rules_only": report_json(&r.rules),
            "rules_only_english": report_json(&r.rules_en),
            "rules_model": model.as_ref().map(|(r, _, id)| json!({"model_id": id, "report": report_json(r)})),
            "rules_model_english": model.as_ref().map(|(_, r, _)| report_json(r)),
            "presidio_english": presidio_out.as_ref().map(|(r, c)| json!({"config": c, "report": report_json(r)})),
            "rules_only_mb_per_s": r.bench.map(|b| b.0),
        })
    );
}

/// The tables: each system on the split, then the English notes side by side.
fn print_tables(a: &EvalDeidArgs, english: usize, r: &Results) -> anyhow::Result<()> {
    let Results {
        rules,
        rules_en,
        model,
        presidio_out,
        bench,
    } = r;
    println!(
        "{}",
        table(&format!("Rules only, split {}", a.split), rules)
    );
    if let Some((r, _, id)) = model {
        println!(
            "{}",
            table(&format!("Rules + model ({id}), split {}", a.split), r)
        );
    }
    if let Some((r, config)) = presidio_out {
        println!("{}", table("Presidio, English notes", r));
        println!(
            "Presidio configuration: {}",
            serde_json::to_string_pretty(config)?
        );
    }
    println!(
        "\nEnglish notes side by side ({} notes)\n\n| system | token recall | span recall | precision | F1 | leak rate |\n|---|---:|---:|---:|---:|---:|",
        english
    );
    let side = |name: &str, c: &Counts| {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            pct(c.token_recall()),
            pct(c.span_recall()),
            pct(c.precision()),
            pct(c.f1()),
            pct(c.leak_rate())
        )
    };
    side("medgemma-deid rules only", &rules_en.overall);
    if let Some((_, r, _)) = model {
        side("medgemma-deid rules + model", &r.overall);
    }
    if let Some((r, _)) = presidio_out {
        side("Presidio (spaCy en_core_web_sm)", &r.overall);
    }
    if let Some((mbs, bytes)) = *bench {
        println!(
            "\nRules-only throughput, one core: {mbs:.2} MB/s ({:.1} MB of notes)",
            bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// `--min-recall`, `--min-precision`, `--min-margin`.
fn check_gates(a: &EvalDeidArgs, r: &Results) -> anyhow::Result<()> {
    let o = r.rules.overall;
    if let Some(m) = a.min_recall
        && o.token_recall() < m
    {
        bail!("rules-only token recall {:.4} < {m}", o.token_recall());
    }
    if let Some(m) = a.min_precision
        && o.precision() < m
    {
        bail!("rules-only precision {:.4} < {m}", o.precision());
    }
    if let Some(m) = a.min_margin {
        let Some((p, _)) = &r.presidio_out else {
            bail!("--min-margin needs Presidio (drop --no-presidio)");
        };
        let margin = r.rules_en.overall.token_recall() - p.overall.token_recall();
        if margin < m {
            bail!("rules-only beats Presidio's English token recall by {margin:.4} < {m}");
        }
    }
    Ok(())
}

/// Flags of `medgemma deidentify`.
#[derive(Debug, clap::Args)]
pub struct DeidentifyArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Read the note from this file (`-` for stdin).
    #[arg(long, required_unless_present = "text", conflicts_with = "text")]
    pub file: Option<PathBuf>,
    /// The note.
    #[arg(long)]
    pub text: Option<String>,
    /// `en`, `zh-TW` or `auto`.
    #[arg(long, default_value = "auto")]
    pub language: String,
    /// `redact`, `mask` or `surrogate`.
    #[arg(long, default_value = "redact")]
    pub mode: String,
    /// Seed of the surrogates (default: random).
    #[arg(long)]
    pub surrogate_seed: Option<u64>,
    /// Rules only: skip the model pass.
    #[arg(long)]
    pub no_model: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// `medgemma deidentify`.
pub fn deidentify(a: DeidentifyArgs) -> anyhow::Result<()> {
    let text = match (a.text, &a.file) {
        (Some(t), _) => t,
        (None, Some(p)) if p.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading the note from stdin")?
        }
        (None, Some(p)) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the note from {}", p.display()))?,
        (None, None) => bail!("give --file or --text"),
    };
    let mode = match a.mode.to_ascii_lowercase().as_str() {
        "redact" => pb::DeidentifyMode::Redact,
        "mask" => pb::DeidentifyMode::Mask,
        "surrogate" => pb::DeidentifyMode::Surrogate,
        other => bail!("--mode must be redact, mask or surrogate, not {other:?}"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = connect_with(&a.connect).await?;
        let r = client
            .deidentify(request(
                pb::DeidentifyRequest {
                    text,
                    language: a.language,
                    mode: mode.into(),
                    surrogate_seed: a.surrogate_seed,
                    use_model: Some(!a.no_model),
                    sampling: a.sampling.to_proto(),
                },
                a.connect.timeout,
            ))
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let source = |s: i32| match pb::SpanSource::try_from(s) {
            Ok(pb::SpanSource::Rule) => "rule",
            Ok(pb::SpanSource::Model) => "model",
            Ok(pb::SpanSource::Both) => "both",
            _ => "?",
        };
        if a.connect.json {
            let spans: Vec<Value> = r
                .spans
                .iter()
                .map(|s| {
                    json!({"start": s.start, "end": s.end, "byte_start": s.byte_start, "byte_end": s.byte_end,
                        "type": s.r#type, "source": source(s.source), "confidence": s.confidence})
                })
                .collect();
            let u = r.usage.unwrap_or_default();
            println!(
                "{}",
                json!({"text": r.text, "spans": spans, "language": r.language, "model_id": r.model_id,
                    "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens},
                    "truncated_windows": r.truncated_windows, "disclaimer": r.disclaimer})
            );
        } else {
            println!("{}\n", r.text);
            println!("{} spans (language {}):", r.spans.len(), r.language);
            for s in &r.spans {
                println!(
                    "  {:>6}..{:<6} {:<13} {:<5} {:.2}",
                    s.start,
                    s.end,
                    s.r#type,
                    source(s.source),
                    s.confidence
                );
            }
            let u = r.usage.unwrap_or_default();
            println!(
                "[model {} | {} prompt + {} completion tokens | {} truncated windows]\nDisclaimer: {}",
                if r.model_id.is_empty() { "none (rules only)" } else { &r.model_id },
                u.prompt_tokens,
                u.completion_tokens,
                r.truncated_windows,
                r.disclaimer
            );
        }
        Ok(())
    })
}

/// Rules + model through the gateway's `Deidentify`, `concurrency` notes in flight: the spans
/// of every note by id, and the model id the gateway reported.
async fn model_pass(
    gateway: &str,
    notes: &[Note],
    concurrency: usize,
) -> anyhow::Result<(HashMap<String, Vec<Predicted>>, String)> {
    let client = connect(gateway, None, ApiKey::from_env()?).await?;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for n in notes {
        let (mut client, gate) = (client.clone(), gate.clone());
        let (id, text, language) = (n.id.clone(), n.text.clone(), n.lang.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let r = client
                .deidentify(request(
                    pb::DeidentifyRequest {
                        text,
                        language,
                        mode: pb::DeidentifyMode::Redact.into(),
                        surrogate_seed: None,
                        use_model: Some(true),
                        sampling: None,
                    },
                    std::time::Duration::from_secs(1800),
                ))
                .await
                .map_err(|s| anyhow::anyhow!("Deidentify: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            let spans = r
                .spans
                .into_iter()
                .map(|s| Predicted {
                    start: s.start as usize,
                    end: s.end as usize,
                    ty: s.r#type,
                })
                .collect::<Vec<_>>();
            Ok::<_, anyhow::Error>((id, spans, r.model_id))
        });
    }
    let (mut out, mut model_id) = (HashMap::new(), String::new());
    while let Some(joined) = tasks.join_next().await {
        let (id, spans, model) = joined??;
        model_id = model;
        out.insert(id, spans);
        eprintln!("rules+model: {}/{} notes", out.len(), notes.len());
    }
    Ok((out, model_id))
}
