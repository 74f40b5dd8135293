//! Robustness against the running suite: hostile inputs each get a clear status within their
//! deadline and leave every service SERVING and answering; a stalled stream reader is cut and
//! its generation freed. (A module of the e2e test binary: it shares its suite.)

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use medgemma_gateway::GatewayArgs;
use medgemma_proto::gateway::v1 as pb;
use medgemma_proto::generation::v1 as gen_pb;
use medgemma_proto::tokenizer::v1 as tok_pb;
use medgemma_rpc::client::ServingStatus;
use medgemma_suite::{Suite, start_gateway};
use medgemma_vision::hostile::{
    dicom_with_dimensions, insert_before_pixel_data, j2k_codestream_claiming,
    nested_dicom_sequences, png_header_only,
};
use pb::clinical_tasks_client::ClinicalTasksClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::{CT_DICOM, shared};

/// Every hostile call must be answered within this.
const DEADLINE: Duration = Duration::from_secs(60);

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("reachable")
}

fn req_within<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(DEADLINE);
    r
}

/// Asserts `r` failed with `code` within the deadline; returns its message.
fn refused<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    code: Code,
    t: Instant,
) -> String {
    let s = r.expect_err(what);
    assert_eq!(s.code(), code, "{what}: {s:?}");
    assert!(t.elapsed() < DEADLINE, "{what}: {:?}", t.elapsed());
    s.message().to_owned()
}

/// A real RLE-compressed DICOM and a JPEG 2000 one (pydicom's test files).
static RLE_DICOM: LazyLock<Vec<u8>> =
    LazyLock::new(|| medgemma_test_support::image("SC_rgb_rle.dcm"));
static J2K_DICOM: LazyLock<Vec<u8>> =
    LazyLock::new(|| medgemma_test_support::image("US1_J2KI.dcm"));

/// `AskRequest` with its `question` as raw bytes, to send what a string field cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawAskRequest {
    #[prost(bytes = "vec", tag = "1")]
    question: Vec<u8>,
}

/// `ClinicalTasks/Ask` with `question` as raw bytes.
async fn raw_ask(
    addr: std::net::SocketAddr,
    question: Vec<u8>,
) -> Result<pb::AskResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel(addr).await);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<RawAskRequest, pb::AskResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/medgemma.gateway.v1.ClinicalTasks/Ask");
    grpc.unary(req_within(RawAskRequest { question }), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

async fn all_serving(s: &Suite) {
    let mut addrs = vec![s.gateway.addr, s.tokenizer.addr, s.vision.addr];
    addrs.extend(s.text.iter().map(|g| g.server.addr));
    addrs.push(s.multimodal.server.addr);
    for addr in addrs {
        let status = medgemma_rpc::client::health_status(channel(addr).await, "")
            .await
            .unwrap();
        assert_eq!(status, ServingStatus::Serving, "{addr}");
    }
}

#[test]
fn hostile_inputs_get_clear_statuses_and_the_suite_keeps_serving() {
    let Some(sh) = shared() else { return };
    sh.rt.block_on(async {
        let s = &sh.suite;
        let mut gw = ClinicalTasksClient::new(channel(s.gateway.addr).await)
            .max_encoding_message_size(64 << 20);

        // A DICOM whose sequences nest 10,000 deep (it overflowed the encoder's stack).
        let t = Instant::now();
        let r = gw
            .draft_radiology_report(req_within(pb::DraftRadiologyReportRequest {
                image: Some(pb::Image {
                    data: insert_before_pixel_data(&CT_DICOM, &nested_dicom_sequences(10_000))
                        .unwrap(),
                    mime_type: "application/dicom".into(),
                }),
                modality: "CT".into(),
                body_part: "head".into(),
                sampling: None,
            }))
            .await;
        let m = refused("nested DICOM", r, Code::InvalidArgument, t);
        assert!(m.contains("nesting depth"), "{m}");

        // Decompression bombs: a PNG header declaring 100,000 x 100,000, an RLE DICOM and a
        // JPEG 2000 DICOM declaring 65,535 x 65,535 in their headers, a JPEG 2000 codestream
        // claiming 60,000 x 60,000 inside a small DICOM. Refused before any pixel buffer.
        let bombs = [
            ("PNG bomb", png_header_only(100_000, 100_000), "image/png"),
            (
                "RLE bomb",
                dicom_with_dimensions(&RLE_DICOM, 65_535, 65_535).unwrap(),
                "application/dicom",
            ),
            (
                "JPEG 2000 header bomb",
                dicom_with_dimensions(&J2K_DICOM, 65_535, 65_535).unwrap(),
                "application/dicom",
            ),
            (
                "JPEG 2000 codestream bomb",
                j2k_codestream_claiming(&J2K_DICOM, 60_000, 60_000).unwrap(),
                "application/dicom",
            ),
        ];
        for (what, data, mime) in bombs {
            let t = Instant::now();
            let r = gw
                .draft_radiology_report(req_within(pb::DraftRadiologyReportRequest {
                    image: Some(pb::Image {
                        data,
                        mime_type: mime.into(),
                    }),
                    modality: "CR".into(),
                    body_part: "chest".into(),
                    sampling: None,
                }))
                .await;
            let m = refused(what, r, Code::InvalidArgument, t);
            assert!(
                m.contains("pixels") || m.contains("--max-image-pixels"),
                "{what}: {m}"
            );
        }

        // Invalid UTF-8 in a string field: tonic cannot decode the message; the caller sent
        // bad input, so INVALID_ARGUMENT (not INTERNAL), naming no content.
        let t = Instant::now();
        let r = raw_ask(s.gateway.addr, vec![b'a', 0xFF, 0xFE, b'b']).await;
        let m = refused("invalid UTF-8", r, Code::InvalidArgument, t);
        assert!(m.contains("UTF-8"), "{m}");

        // A 1 MB question of special-token strings: over the text limit.
        let t = Instant::now();
        let r = gw
            .ask(req_within(pb::AskRequest {
                question: "<start_of_turn>".repeat(70_000),
                system: None,
                sampling: None,
            }))
            .await;
        refused("1 MB of special tokens", r, Code::InvalidArgument, t);

        // A message over the gateway's decoded-size limit (just above its image limit).
        let t = Instant::now();
        let r = gw
            .ask(req_within(pb::AskRequest {
                question: "a".repeat(24 << 20),
                system: None,
                sampling: None,
            }))
            .await;
        let s_code = r.as_ref().map(|_| ()).unwrap_err().code();
        assert!(
            matches!(s_code, Code::ResourceExhausted | Code::OutOfRange),
            "{r:?}"
        );
        assert!(t.elapsed() < DEADLINE);

        // 100k tokens inside the text limit: over the gateway's prompt token cap.
        let t = Instant::now();
        let r = gw
            .ask(req_within(pb::AskRequest {
                question: " a".repeat(100_000),
                system: None,
                sampling: None,
            }))
            .await;
        let m = refused("100k-token Ask", r, Code::InvalidArgument, t);
        assert!(m.contains("--max-input-tokens"), "{m}");

        // A deeply nested JSON-looking note: served (it is just text) or refused, never a hang.
        let t = Instant::now();
        let r = gw
            .summarize_clinical_note(req_within(pb::SummarizeClinicalNoteRequest {
                note: format!("{}\"x\"{}", "{\"a\":[".repeat(2000), "]}".repeat(2000)),
                output_language: None,
                sampling: Some(pb::Sampling {
                    max_new_tokens: Some(8),
                    ..Default::default()
                }),
            }))
            .await;
        if let Err(e) = &r {
            assert!(
                matches!(e.code(), Code::InvalidArgument | Code::ResourceExhausted),
                "{e:?}"
            );
        }
        assert!(t.elapsed() < DEADLINE);

        // image_count 2^31 to the tokenizer directly.
        let mut tok =
            tok_pb::tokenizer_client::TokenizerClient::new(channel(s.tokenizer.addr).await);
        let t = Instant::now();
        let r = tok
            .encode(req_within(tok_pb::EncodeRequest {
                text: "<start_of_image>".into(),
                add_special_tokens: true,
                image_count: 1 << 31,
                tokens_per_image: None,
            }))
            .await;
        let m = refused("image_count 2^31", r, Code::InvalidArgument, t);
        assert!(m.contains("--max-image-tokens"), "{m}");

        // The generator directly: no more than the gateway would allow.
        let mut gen_client =
            gen_pb::generator_client::GeneratorClient::new(channel(s.text[0].server.addr).await)
                .max_encoding_message_size(64 << 20);
        let t = Instant::now();
        let r = gen_client
            .generate(req_within(gen_pb::GenerateRequest {
                prompt_ids: vec![2, 100],
                sampling: Some(gen_pb::SamplingParams {
                    max_new_tokens: Some(1_000_000),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await;
        let m = refused("max_new_tokens 1e6", r, Code::InvalidArgument, t);
        assert!(m.contains("--max-new-tokens-limit"), "{m}");
        let t = Instant::now();
        let r = gen_client
            .generate(req_within(gen_pb::GenerateRequest {
                prompt_ids: vec![2, 100],
                constraint: Some(gen_pb::Constraint {
                    kind: Some(gen_pb::constraint::Kind::Regex("a".repeat(1 << 20))),
                }),
                ..Default::default()
            }))
            .await;
        let m = refused("1 MB regex", r, Code::InvalidArgument, t);
        assert!(m.contains("--max-constraint-bytes"), "{m}");

        // Afterwards: every service SERVING, and a normal task answers.
        all_serving(s).await;
        let a = gw
            .ask(req_within(pb::AskRequest {
                question: "What is hypertension?".into(),
                system: None,
                sampling: Some(pb::Sampling {
                    temperature: Some(0.0),
                    max_new_tokens: Some(8),
                    ..Default::default()
                }),
            }))
            .await
            .expect("a normal Ask after the attacks")
            .into_inner();
        assert!(!a.answer.is_empty());
    });
}

#[test]
fn a_stalled_stream_reader_is_cut_and_its_generation_cancelled() {
    let Some(sh) = shared() else { return };
    sh.rt.block_on(async {
        let s = &sh.suite;
        let g = s.start_generator(false).await.unwrap();
        let mut args = GatewayArgs::with_pools(
            "127.0.0.1:0",
            vec![s.tokenizer.addr.to_string()],
            vec![g.server.addr.to_string()],
            vec![],
            vec![],
        );
        args.stream_send_timeout = Duration::from_secs(1);
        let gw_server = start_gateway(args).await.unwrap();
        // A client that reads nothing, with 1 KiB HTTP/2 windows: the gateway's sends block
        // after a few dozen deltas.
        let ch = Endpoint::from_shared(format!("http://{}", gw_server.addr))
            .unwrap()
            .initial_stream_window_size(Some(1024))
            .initial_connection_window_size(Some(1024))
            .connect()
            .await
            .unwrap();
        let mut gw = ClinicalTasksClient::new(ch);
        let mut stream = gw
            .ask_stream(req_within(pb::AskRequest {
                question: "List every drug class used for hypertension, heart failure, diabetes, \
                           asthma and epilepsy, with examples, doses and side effects."
                    .into(),
                system: None,
                sampling: Some(pb::Sampling {
                    temperature: Some(1.0),
                    max_new_tokens: Some(4000),
                    seed: Some(1),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap()
            .into_inner();
        // The generation starts, then (nobody reading) is cancelled well before its 4000
        // tokens could be done.
        let t = Instant::now();
        while g.service.stats().active_sequences == 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        loop {
            let st = g.service.stats();
            if st.active_sequences == 0 && st.queue_depth == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the stalled stream's generation still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Reading now: what was buffered, then RESOURCE_EXHAUSTED naming the flag, never OK.
        let mut deltas = 0;
        let end = loop {
            match stream.message().await {
                Ok(Some(_)) => deltas += 1,
                Ok(None) => panic!("the cut stream ended OK after {deltas} messages"),
                Err(e) => break e,
            }
        };
        assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
        assert!(end.message().contains("--stream-send-timeout"), "{end:?}");
        assert!(deltas > 0);
        drop(gw_server);
        g.server.stop(Duration::from_secs(5)).await.unwrap();
    });
}
