//! Observability across processes: the four service binaries (`medgemma-tokenizer`,
//! `medgemma-vision`, `medgemma-generator`, `medgemma-gateway`, built by `cargo build --bins`
//! beside this test) run as separate processes, each with its own `OTEL_SERVICE_NAME`, exporting
//! spans over OTLP/gRPC to a real `TraceService/Export` receiver served here (the collector's
//! proto, from `opentelemetry-proto`), logging JSON at TRACE level, and serving Prometheus text.
//!
//! - One SummarizeClinicalNote and one DraftRadiologyReport each make one trace across all four
//!   `service.name`s (three for the summary: it sends no image), every span's parent in it.
//! - A canary string rides in a note, a question, an MCQ option, a DICOM's PatientName, a bad
//!   image and an over-long prompt: it is in no exported span, event or attribute, no log line,
//!   no metric and no error message.
//! - Each service's Prometheus text parses (`prometheus-parse`) and, after the tasks, every
//!   documented metric exists with a plausible value.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medgemma_proto::gateway::v1 as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use pb::clinical_tasks_client::ClinicalTasksClient;
use procs::Proc;

mod procs;

/// Appears nowhere but in the requests' patient content.
const CANARY: &str = "ZQXCANARY7731";

/// A real DICOM (CT slice, pydicom's test files), re-labelled with the canary as PatientName.
static CT_DICOM: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| medgemma_test_support::image("CT_small.dcm"));

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    start: u64,
    end: u64,
    attributes: HashMap<String, String>,
}

/// The OTLP receiver: every export request as received.
#[derive(Default, Clone)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn value_string(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Receiver {
    fn spans(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for req in self.requests.lock().unwrap().iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .map(|kv| value_string(&kv.value))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push(Span {
                            service: service.clone(),
                            trace_id: s.trace_id.clone(),
                            span_id: s.span_id.clone(),
                            parent: s.parent_span_id.clone(),
                            name: s.name.clone(),
                            start: s.start_time_unix_nano,
                            end: s.end_time_unix_nano,
                            attributes: s
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), value_string(&kv.value)))
                                .collect(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Everything received, as text (names, attributes, events, resources).
    fn dump(&self) -> String {
        format!("{:?}", self.requests.lock().unwrap())
    }
}

/// Starts `bin` with `args`, its own OTEL_SERVICE_NAME, export to `otlp`, JSON logs at TRACE,
/// metrics on a free port; waits for its `listening on` lines.
fn start(bin: &'static str, service: &str, otlp: SocketAddr, args: &[&str]) -> Proc {
    let args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
        .collect();
    let otlp = format!("http://{otlp}");
    procs::spawn(
        bin,
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
            ("OTEL_SERVICE_NAME", service),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("MEDGEMMA_LOG", "trace"),
        ],
    )
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of `name`'s sample with these labels (all samples of the family summed when
/// `labels` is empty), from text parsed by `prometheus-parse`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    // prometheus-parse matches names with `\w+`, which lacks the `:` the exposition format (and
    // vLLM's names) allow: spell the prefix `medgemma__` for it.
    let scrape = prometheus_parse::Scrape::parse(
        text.lines()
            .map(|l| Ok(l.replace("medgemma:", "medgemma__"))),
    )
    .expect("Prometheus text parses");
    let name = name.replace("medgemma:", "medgemma__");
    let mut found = None;
    for s in scrape.samples.iter().filter(|s| s.metric == name) {
        if labels
            .iter()
            .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
        {
            let v = match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            };
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn dicom_with_patient_name(name: &str) -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let dir = std::env::temp_dir().join(format!("medgemma-obs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, dst) = (dir.join("in.dcm"), dir.join("out.dcm"));
    std::fs::write(&src, &*CT_DICOM).unwrap();
    let mut obj = dicom_object::open_file(&src).expect("the CT slice parses");
    obj.put(DataElement::new(
        tags::PATIENT_NAME,
        VR::PN,
        PrimitiveValue::from(name),
    ));
    obj.write_to_file(&dst).expect("the DICOM writes");
    let bytes = std::fs::read(&dst).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(bytes.windows(name.len()).any(|w| w == name.as_bytes()));
    bytes
}

fn traced<T>(msg: T, trace_id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    r.metadata_mut()
        .insert("baggage", "tenant=obs-test".parse().unwrap());
    r.set_timeout(Duration::from_secs(300));
    r
}

fn sampling(n: u32) -> Option<pb::Sampling> {
    Some(pb::Sampling {
        temperature: Some(0.0),
        max_new_tokens: Some(n),
        ..Default::default()
    })
}

/// Prints one trace as an indented tree (span names, services, durations) and checks it: one
/// root whose parent is the client's span, every other parent present.
fn check_trace(spans: &[Span], trace_id: &[u8], want_services: &[&str]) {
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    assert!(!trace.is_empty(), "no span of trace {}", hex(trace_id));
    let ids: HashSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    let client_span = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
    let mut roots = 0;
    for s in &trace {
        if s.parent == client_span {
            roots += 1;
            assert_eq!(s.service, "medgemma-gateway", "the root is the gateway's");
        } else {
            assert!(
                ids.contains(s.parent.as_slice()),
                "span {} ({}) has a parent missing from the trace",
                s.name,
                s.service
            );
        }
    }
    assert_eq!(roots, 1, "one span continues the client's");
    let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for want in want_services {
        assert!(services.contains(want), "no span from {want}: {services:?}");
    }
    let mut children: BTreeMap<&[u8], Vec<&Span>> = BTreeMap::new();
    for s in &trace {
        children.entry(s.parent.as_slice()).or_default().push(s);
    }
    fn print(children: &BTreeMap<&[u8], Vec<&Span>>, parent: &[u8], depth: usize) {
        let mut kids = children.get(parent).cloned().unwrap_or_default();
        kids.sort_by_key(|s| s.start);
        for s in kids {
            println!(
                "{:indent$}{} [{}] {:.1} ms",
                "",
                s.name,
                s.service,
                (s.end.saturating_sub(s.start)) as f64 / 1e6,
                indent = depth * 2
            );
            print(children, &s.span_id, depth + 1);
        }
    }
    println!("trace {}:", hex(trace_id));
    print(&children, &client_span, 1);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn one_trace_across_four_processes_no_patient_data_in_telemetry_and_metrics_parse() {
    let Some(paths) = medgemma_test_support::demo_assets() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let receiver = Receiver::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let otlp = listener.local_addr().unwrap();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let gguf = paths.gguf.to_str().unwrap().to_owned();
    let tok = paths.tokenizer_json.to_str().unwrap().to_owned();
    let mut tokenizer = start(
        "medgemma-tokenizer",
        "medgemma-tokenizer",
        otlp,
        &["--listen", "127.0.0.1:0", "--tokenizer", &tok],
    );
    let mut vision = start(
        "medgemma-vision",
        "medgemma-vision",
        otlp,
        &["--listen", "127.0.0.1:0"],
    );
    // One generator serves both pools: the demo decoder paired with the random demo tower.
    let mut generator = start(
        "medgemma-generator",
        "medgemma-generator",
        otlp,
        &[
            "--listen",
            "127.0.0.1:0",
            "--model",
            &gguf,
            "--tokenizer",
            &tok,
            "--demo-vision",
            "--max-input-tokens",
            "1024",
        ],
    );
    let g = generator.addr.to_string();
    let mut gateway = start(
        "medgemma-gateway",
        "medgemma-gateway",
        otlp,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tokenizer-addr",
            &tokenizer.addr.to_string(),
            "--text-pool",
            &g,
            "--multimodal-pool",
            &g,
            "--vision-pool",
            &vision.addr.to_string(),
        ],
    );

    let summary_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let report_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let errors: Vec<String> = rt.block_on(async {
        let mut c = ClinicalTasksClient::connect(format!("http://{}", gateway.addr))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let note = format!(
            "Patient {CANARY}, 65M, chest tightness and dyspnoea for three days. BNP 450. \
             Diagnosis: acute decompensated HFrEF. IV diuretics; cardiology follow-up."
        );
        c.summarize_clinical_note(traced(
            pb::SummarizeClinicalNoteRequest {
                note,
                output_language: Some("en".into()),
                sampling: sampling(12),
            },
            summary_trace,
        ))
        .await
        .expect("SummarizeClinicalNote");
        c.draft_radiology_report(traced(
            pb::DraftRadiologyReportRequest {
                image: Some(pb::Image {
                    data: dicom_with_patient_name(CANARY),
                    mime_type: "application/dicom".into(),
                }),
                modality: "CT".into(),
                body_part: "chest".into(),
                sampling: sampling(12),
            },
            report_trace,
        ))
        .await
        .expect("DraftRadiologyReport");
        c.ask(tonic::Request::new(pb::AskRequest {
            question: format!("What does {CANARY} mean?"),
            system: None,
            sampling: sampling(4),
        }))
        .await
        .expect("Ask");
        c.answer_multiple_choice(tonic::Request::new(pb::AnswerMultipleChoiceRequest {
            question: "First-line therapy?".into(),
            options: vec![format!("{CANARY} 5 mg"), "Aspirin".into()],
            sampling: sampling(4),
        }))
        .await
        .expect("AnswerMultipleChoice");
        let mut errors = Vec::new();
        // Failing requests: a bad image, a prompt over the generator's input limit.
        let bad = c
            .draft_radiology_report(tonic::Request::new(pb::DraftRadiologyReportRequest {
                image: Some(pb::Image {
                    data: format!("not an image {CANARY}").into_bytes(),
                    mime_type: "image/png".into(),
                }),
                modality: "CT".into(),
                body_part: "chest".into(),
                sampling: sampling(4),
            }))
            .await
            .expect_err("a bad image fails");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
        errors.push(format!("{bad:?}"));
        let long = c
            .ask(tonic::Request::new(pb::AskRequest {
                question: format!("{CANARY} ").repeat(400),
                system: None,
                sampling: sampling(4),
            }))
            .await
            .expect_err("an over-long prompt fails");
        assert_eq!(long.code(), tonic::Code::InvalidArgument, "{long:?}");
        errors.push(format!("{long:?}"));
        errors
    });
    for e in &errors {
        assert!(
            !e.contains(CANARY),
            "an error message carries patient data: {e}"
        );
    }

    // Metrics, before the processes stop. A backend counts a call when its response body
    // ends, a moment after the gateway has the last message: wait for the generator's count
    // of streams to reach its count of first tokens (one per generation) and hold.
    let settled = Instant::now();
    loop {
        let text = scrape(generator.metrics());
        let streams = sample(
            &text,
            "medgemma:requests_total",
            &[("method", "GenerateStream"), ("code", "OK")],
        );
        let ttft = sample(&text, "medgemma:time_to_first_token_seconds_count", &[]);
        if (streams.is_some() && streams == ttft) || settled.elapsed() > Duration::from_secs(15) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let texts: Vec<(&str, String)> = [&tokenizer, &vision, &generator, &gateway]
        .iter()
        .map(|p| (p.name, scrape(p.metrics())))
        .collect();
    for (name, text) in &texts {
        assert!(
            !text.contains(CANARY),
            "{name}'s metrics carry patient data"
        );
        assert!(
            sample(text, "medgemma:process_resident_memory_bytes", &[]).unwrap() > 1e6,
            "{name}: RSS"
        );
    }
    let all: String = texts.iter().map(|(_, t)| t.as_str()).collect();
    for family in medgemma_rpc::metrics::DOCUMENTED {
        let found = all
            .lines()
            .any(|l| l.starts_with(family) && !l.starts_with('#'));
        let found = found
            || all
                .lines()
                .any(|l| l.starts_with(&format!("{family}_count")));
        assert!(found, "no sample of {family} in any service's metrics");
    }
    let gw = &texts[3].1;
    let ok = |text: &str, svc: &str, method: &str| {
        sample(
            text,
            "medgemma:requests_total",
            &[("service", svc), ("method", method), ("code", "OK")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(ok(gw, "medgemma-gateway", "SummarizeClinicalNote"), 1.0);
    assert_eq!(ok(gw, "medgemma-gateway", "DraftRadiologyReport"), 1.0);
    assert_eq!(
        sample(
            gw,
            "medgemma:requests_total",
            &[
                ("method", "DraftRadiologyReport"),
                ("code", "INVALID_ARGUMENT")
            ]
        ),
        Some(1.0)
    );
    let gen_text = &texts[2].1;
    let generated = ok(gen_text, "medgemma-generator", "GenerateStream");
    assert!(generated >= 4.0, "the generator served {generated} streams");
    let ttft = sample(gen_text, "medgemma:time_to_first_token_seconds_count", &[]).unwrap();
    let calls: Vec<&str> = gen_text
        .lines()
        .filter(|l| {
            l.starts_with("medgemma:requests_total")
                || l.starts_with("medgemma:time_to_first_token_seconds_count")
        })
        .collect();
    assert_eq!(
        ttft, generated,
        "one TTFT per generation request: {calls:#?}"
    );
    let by_task = sample(
        gen_text,
        "medgemma:requests_total",
        &[("task", "summarize"), ("code", "OK")],
    );
    assert_eq!(
        by_task,
        Some(1.0),
        "the generator counts by the gateway's task"
    );
    assert!(sample(gen_text, "medgemma:generation_tokens_total", &[]).unwrap() >= 4.0);
    assert!(sample(gen_text, "medgemma:prompt_tokens_total", &[]).unwrap() > 20.0);
    let vis = &texts[1].1;
    assert!(
        sample(
            vis,
            "medgemma:vision_images_total",
            &[("outcome", "encoded")]
        )
        .unwrap()
            >= 1.0
    );

    // --log-content is the one way content reaches a log: a second gateway with it logs the
    // prompt it encodes and the answer at debug level, and warns at start-up.
    let g = generator.addr.to_string();
    let tok = tokenizer.addr.to_string();
    let open = procs::spawn(
        "medgemma-gateway",
        &[
            "--listen",
            "127.0.0.1:0",
            "--tokenizer-addr",
            &tok,
            "--text-pool",
            &g,
            "--log-content",
            "--log-format",
            "json",
        ],
        &[("MEDGEMMA_LOG", "debug")],
    );
    rt.block_on(async {
        let mut c = ClinicalTasksClient::connect(format!("http://{}", open.addr))
            .await
            .unwrap();
        c.ask(pb::AskRequest {
            question: format!("{CANARY}: what is angina?"),
            system: None,
            sampling: sampling(4),
        })
        .await
        .expect("the --log-content gateway answers");
    });
    let logs = open.logs();
    assert!(
        logs.contains("--log-content is on"),
        "no start-up warning: {logs}"
    );
    assert!(logs.contains(CANARY), "--log-content logged no content");
    drop(open);

    // SIGTERM flushes each exporter; then every span is in.
    for p in [&mut gateway, &mut generator, &mut vision, &mut tokenizer] {
        p.terminate();
    }
    let spans = receiver.spans();
    let id = |h: &str| {
        (0..16)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    check_trace(
        &spans,
        &id(summary_trace),
        &[
            "medgemma-gateway",
            "medgemma-tokenizer",
            "medgemma-generator",
        ],
    );
    check_trace(
        &spans,
        &id(report_trace),
        &[
            "medgemma-gateway",
            "medgemma-tokenizer",
            "medgemma-vision",
            "medgemma-generator",
        ],
    );
    let names: HashSet<&str> = spans
        .iter()
        .filter(|s| s.trace_id == id(report_trace))
        .map(|s| s.name.as_str())
        .collect();
    for want in [
        "encode",
        "vision.embed",
        "image_decode",
        "tower_forward",
        "queue",
        "prefill",
        "decode",
        "constraint.compile",
    ] {
        assert!(
            names.contains(want),
            "no {want} span in the report's trace: {names:?}"
        );
    }
    let chat = spans
        .iter()
        .find(|s| s.trace_id == id(summary_trace) && s.name.starts_with("chat"))
        .expect("a GenAI chat span");
    for key in [
        "gen_ai.operation.name",
        "gen_ai.provider.name",
        "gen_ai.request.model",
        "gen_ai.request.temperature",
        "gen_ai.request.max_tokens",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons",
    ] {
        assert!(chat.attributes.contains_key(key), "chat span lacks {key}");
    }
    // Prefill: how much the prefix cache served, and one span per forward step it took.
    let prefill = spans
        .iter()
        .find(|s| s.trace_id == id(summary_trace) && s.name == "prefill")
        .expect("a prefill span");
    assert!(
        prefill
            .attributes
            .contains_key("medgemma.prefix_cache.tokens_reused")
    );
    let chunks: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent == prefill.span_id && s.name == "prefill.chunk")
        .collect();
    assert!(
        !chunks.is_empty(),
        "no prefill.chunk under the prefill span"
    );
    assert_eq!(
        prefill.attributes["medgemma.prefill.chunks"],
        chunks.len().to_string()
    );
    let decode = spans
        .iter()
        .find(|s| s.trace_id == id(summary_trace) && s.name == "decode")
        .expect("a decode span");
    assert!(
        decode.attributes["medgemma.decode.steps"]
            .parse::<u32>()
            .unwrap()
            >= 1
    );

    // The canary: in no span, event or attribute, in no log line of any service.
    assert!(
        !receiver.dump().contains(CANARY),
        "an exported span carries patient data"
    );
    for p in [&tokenizer, &vision, &generator, &gateway] {
        let logs = p.stderr.lock().unwrap();
        assert!(
            logs.lines().count() > 10,
            "{} logged little at TRACE",
            p.name
        );
        assert!(
            logs.contains("\"trace_id\""),
            "{}'s JSON logs carry trace ids",
            p.name
        );
        assert!(!logs.contains(CANARY), "{} logged patient data", p.name);
    }
}
