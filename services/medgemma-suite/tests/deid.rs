//! `ClinicalTasks/Deidentify` end to end through the real in-process suite (demo model), with
//! every log line of the process captured at TRACE level: nothing of the note, the spans or the
//! surrogates may appear in them.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medgemma_proto::gateway::v1 as pb;
use medgemma_suite::{Suite, SuiteOptions};
use pb::clinical_tasks_client::ClinicalTasksClient;
use tonic::Code;

/// Distinctive identifiers: none of them may reach a log line.
const NOTE: &str = "Patient: Quillon Brightwater\nMRN: 88317742\nDOB: 03/14/1931\n\
Mr. Brightwater is a 93-year-old man admitted to Zephyrine Memorial Hospital on 2024-02-11. \
Call 415-555-0137 or quillon.b@example.org. 病患姓名：龔澤霖，身分證字號：A123456789，\
手機0912-345-678，民國113年2月11日入院。";
const CANARIES: &[&str] = &[
    "Quillon",
    "Brightwater",
    "88317742",
    "03/14/1931",
    "Zephyrine",
    "415-555-0137",
    "quillon.b@example.org",
    "龔澤霖",
    "A123456789",
    "0912-345-678",
    "113年2月11日",
];

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn deidentify_through_the_suite_and_nothing_in_the_logs() {
    if medgemma_test_support::demo_assets().is_none() {
        return;
    }
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_writer(move || writer.clone())
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let suite = Suite::start(SuiteOptions {
            fetch: false,
            ..SuiteOptions::default()
        })
        .await
        .expect("the suite starts");
        let mut c = ClinicalTasksClient::connect(format!("http://{}", suite.gateway.addr))
            .await
            .expect("gateway");
        let req = |r: pb::DeidentifyRequest| {
            let mut q = tonic::Request::new(r);
            q.set_timeout(Duration::from_secs(300));
            q
        };

        // Rules + model (the demo model), REDACT.
        let r = c
            .deidentify(req(pb::DeidentifyRequest {
                text: NOTE.into(),
                mode: pb::DeidentifyMode::Redact.into(),
                sampling: Some(pb::Sampling {
                    max_new_tokens: Some(48),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await
            .expect("Deidentify")
            .into_inner();
        for canary in CANARIES {
            assert!(!r.text.contains(canary), "{canary} left in {:?}", r.text);
        }
        assert!(
            r.text.contains("[NAME]")
                && r.text.contains("[MRN]")
                && r.text.contains("[NATIONAL_ID]")
        );
        assert!(!r.model_id.is_empty(), "the model pass ran");
        let u = r.usage.expect("usage");
        assert!(u.prompt_tokens > 0 && u.completion_tokens > 0);
        assert_eq!(r.language, "en");
        let chars: Vec<char> = NOTE.chars().collect();
        for s in &r.spans {
            let by_chars: String = chars[s.start as usize..s.end as usize].iter().collect();
            assert_eq!(by_chars, &NOTE[s.byte_start as usize..s.byte_end as usize]);
            assert!(s.confidence > 0.0 && s.confidence <= 1.0);
            assert_ne!(s.source, pb::SpanSource::Unspecified as i32);
        }
        assert!(r.spans.iter().any(|s| s.r#type == "AGE"));
        assert_eq!(r.disclaimer, medgemma_gateway::prompt::DEFAULT_DISCLAIMER);

        // Rules only, SURROGATE, seeded: deterministic, consistent, no generator call.
        let sur = |seed| pb::DeidentifyRequest {
            text: NOTE.into(),
            language: "auto".into(),
            mode: pb::DeidentifyMode::Surrogate.into(),
            surrogate_seed: Some(seed),
            use_model: Some(false),
            sampling: None,
        };
        let a = c
            .deidentify(req(sur(5)))
            .await
            .expect("surrogate")
            .into_inner();
        let b = c
            .deidentify(req(sur(5)))
            .await
            .expect("surrogate")
            .into_inner();
        assert_eq!(a.text, b.text);
        assert!(a.model_id.is_empty() && a.usage.unwrap_or_default().completion_tokens == 0);
        assert!(a.text.contains("90 or older"), "{}", a.text);
        for canary in CANARIES {
            assert!(
                !a.text.contains(canary),
                "{canary} left in the surrogate text"
            );
        }

        // MASK keeps the length in characters.
        let m = c
            .deidentify(req(pb::DeidentifyRequest {
                text: NOTE.into(),
                language: "en".into(),
                mode: pb::DeidentifyMode::Mask.into(),
                use_model: Some(false),
                ..Default::default()
            }))
            .await
            .expect("mask")
            .into_inner();
        assert_eq!(m.text.chars().count(), NOTE.chars().count());

        // Bad requests: field violations.
        for (r, want) in [
            (pb::DeidentifyRequest::default(), vec!["text"]),
            (
                pb::DeidentifyRequest {
                    text: "x".into(),
                    language: "fr".into(),
                    mode: 7,
                    ..Default::default()
                },
                vec!["language", "mode"],
            ),
            (
                pb::DeidentifyRequest {
                    text: "x".repeat((256 << 10) + 1),
                    ..Default::default()
                },
                vec!["text"],
            ),
        ] {
            let e = c.deidentify(req(r)).await.expect_err("invalid");
            assert_eq!(e.code(), Code::InvalidArgument);
            let got: Vec<String> = medgemma_rpc::field_violations(&e)
                .into_iter()
                .map(|v| v.field)
                .collect();
            assert_eq!(got, want);
            for canary in CANARIES {
                assert!(!e.message().contains(canary));
            }
        }
        let errors = suite.stop(Duration::from_secs(20)).await;
        assert!(errors.is_empty(), "{errors:?}");
    });
    let logs = String::from_utf8_lossy(&logs.0.lock().expect("log buffer")).into_owned();
    assert!(
        logs.contains("Deidentify"),
        "the capture sees the RPC spans"
    );
    for canary in CANARIES {
        assert!(!logs.contains(canary), "{canary} appears in the logs");
    }
}
