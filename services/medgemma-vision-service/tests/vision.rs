//! The vision service in-process on 127.0.0.1:0 with the seeded random demo tower: batching of
//! waiting requests, the embedding cache, per-request failures inside a batch, overload, and
//! `Stats`. The encoder is held (`VisionService::hold`) while requests queue up, so every batch
//! is formed deterministically, not by timing.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use medgemma_proto::vision::v1 as pb;
use medgemma_proto::vision::v1::vision_encoder_client::VisionEncoderClient;
use medgemma_rpc::ServeOptions;
use medgemma_vision::{DecodeOptions, VisionEncoder};
use medgemma_vision_service::{RunningVision, VisionService, VisionSettings};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const SEED: u64 = 11;
const HIDDEN: usize = 64;
/// Batched embeddings must equal one-at-a-time ones to this.
const TOL: f32 = 1e-5;

fn read(rel: &str) -> Vec<u8> {
    medgemma_test_support::read(medgemma_test_support::repo_root().join(rel))
}

/// Four different images: PNGs of two shapes, a JPEG, a DICOM CT slice.
fn images() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("gradient.png", read("fixtures/images/gradient_90x60.png")),
        ("tall.png", read("fixtures/images/tall.png")),
        ("exif_420.jpg", read("fixtures/images/exif_420.jpg")),
        ("CT_small.dcm", read("fixtures/images/CT_small.dcm")),
    ]
}

/// PNG magic (so the edge's format check passes), then nothing a decoder can read.
fn broken_png() -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend_from_slice(&[0x5a; 64]);
    b
}

fn image(data: &[u8]) -> pb::Image {
    pb::Image {
        data: data.to_vec(),
        mime_type: String::new(),
        dicom_frame: None,
    }
}

fn encoder() -> VisionEncoder {
    VisionEncoder::demo(HIDDEN, SEED, &Device::Cpu, DType::F32).unwrap()
}

/// What the tower gives for `bytes` alone.
fn alone(bytes: &[u8]) -> Vec<f32> {
    encoder()
        .encode_bytes(bytes, &DecodeOptions::default())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn values(e: &pb::Embedding) -> Vec<f32> {
    assert_eq!(e.dtype, "f32");
    e.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

use medgemma_test_support::max_abs_diff_f32 as max_abs_diff;
use medgemma_test_support::server::{self, InProcess};

struct Fixture {
    service: VisionService,
    client: VisionEncoderClient<Channel>,
    _server: InProcess<RunningVision>,
}

fn settings(max_batch_images: usize, cache_bytes: usize, queue_capacity: usize) -> VisionSettings {
    VisionSettings {
        max_batch_images,
        embedding_cache_bytes: cache_bytes,
        queue_capacity,
        ..VisionSettings::new("demo-siglip-random")
    }
}

async fn start(settings: VisionSettings) -> Fixture {
    let service = VisionService::new(encoder(), settings).unwrap();
    let server = server::start(
        |listen, shutdown| {
            medgemma_vision_service::serve(
                service.clone(),
                listen,
                shutdown,
                ServeOptions::default(),
            )
        },
        |r| r.local_addr,
    )
    .await;
    Fixture {
        service,
        client: medgemma_rpc::with_limits!(VisionEncoderClient::new(server.channel.clone())),
        _server: server,
    }
}

type Call = tokio::task::JoinHandle<Result<pb::EmbedResponse, tonic::Status>>;

fn send(f: &Fixture, images: Vec<pb::Image>) -> Call {
    let mut client = f.client.clone();
    tokio::spawn(async move {
        client
            .embed(pb::EmbedRequest { images })
            .await
            .map(tonic::Response::into_inner)
    })
}

/// Waits until `done` holds (the requests reached the queue), failing after 20 s.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn stats(f: &Fixture) -> pb::StatsResponse {
    f.client
        .clone()
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_encoded_in_one_batch_with_the_embeddings_of_one_at_a_time() {
    let f = start(settings(4, 0, 8)).await;
    let imgs = images();
    let hold = f.service.hold();
    let calls: Vec<Call> = imgs.iter().map(|(_, b)| send(&f, vec![image(b)])).collect();
    wait_for("4 waiting requests", || f.service.stats().waiting == 4).await;
    assert_eq!(stats(&f).await.batches, 0, "nothing runs while held");
    drop(hold);
    for ((name, bytes), call) in imgs.iter().zip(calls) {
        let r = call
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("{name}: {s}"));
        assert_eq!(r.embeddings.len(), 1);
        let e = &r.embeddings[0];
        assert_eq!(e.shape, [64, HIDDEN as u32]);
        let d = max_abs_diff(&values(e), &alone(bytes));
        assert!(d <= TOL, "{name}: batched embeddings differ by {d}");
    }
    let s = stats(&f).await;
    assert_eq!(
        (s.batches, s.last_batch_images, s.largest_batch_images),
        (1, 4, 4),
        "{s:?}"
    );
    assert_eq!((s.images_encoded, s.max_batch_images), (4, 4));
    assert_eq!(
        (s.cache_queries, s.cache_hits, s.cache_capacity_bytes),
        (0, 0, 0)
    );
    assert_eq!(s.queue_depth, 0);
    let local = f.service.stats();
    assert_eq!(
        (local.batches, local.largest_batch_images, local.waiting),
        (1, 4, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_bigger_than_a_batch_runs_in_several_and_batches_never_exceed_the_limit() {
    let f = start(settings(2, 0, 8)).await;
    let imgs = images();
    let hold = f.service.hold();
    // Three images in one request, then a request of two: batches of at most 2 images.
    let big = send(&f, imgs[..3].iter().map(|(_, b)| image(b)).collect());
    let small = send(&f, imgs[2..].iter().map(|(_, b)| image(b)).collect());
    wait_for("2 waiting requests", || f.service.stats().waiting == 2).await;
    drop(hold);
    let big = big.await.unwrap().unwrap();
    let small = small.await.unwrap().unwrap();
    for (e, (name, bytes)) in big
        .embeddings
        .iter()
        .chain(&small.embeddings)
        .zip(imgs[..3].iter().chain(&imgs[2..]))
    {
        let d = max_abs_diff(&values(e), &alone(bytes));
        assert!(d <= TOL, "{name}: differs by {d}");
    }
    let s = stats(&f).await;
    assert_eq!(s.largest_batch_images, 2, "{s:?}");
    assert_eq!((s.batches, s.images_encoded), (3, 5), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_image_fails_only_its_own_request() {
    let f = start(settings(4, 0, 8)).await;
    let imgs = images();
    let broken = broken_png();
    let hold = f.service.hold();
    let good: Vec<Call> = imgs[..3]
        .iter()
        .map(|(_, b)| send(&f, vec![image(b)]))
        .collect();
    let bad = send(&f, vec![image(&broken)]);
    wait_for("4 waiting requests", || f.service.stats().waiting == 4).await;
    drop(hold);
    let status = bad.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    let fields: Vec<String> = status
        .get_details_bad_request()
        .expect("a BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["images[0].data"]);
    for ((name, bytes), call) in imgs.iter().zip(good) {
        let r = call
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("{name}: {s}"));
        let d = max_abs_diff(&values(&r.embeddings[0]), &alone(bytes));
        assert!(d <= TOL, "{name}: differs by {d}");
    }
    let s = stats(&f).await;
    // One forward over the three images that decoded.
    assert_eq!((s.batches, s.largest_batch_images), (1, 3), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_image_is_served_from_the_cache() {
    let f = start(settings(8, 64 << 20, 8)).await;
    let imgs = images();
    let (png, dcm) = (&imgs[0].1, &imgs[3].1);
    let first = send(&f, vec![image(png)]).await.unwrap().unwrap();
    let s = stats(&f).await;
    assert_eq!(
        (s.batches, s.cache_queries, s.cache_hits),
        (1, 1, 0),
        "{s:?}"
    );
    assert_eq!(s.cache_entries, 1);
    assert!(s.cache_bytes >= (64 * HIDDEN * 4) as u64 && s.cache_bytes <= 64 << 20);

    // The same image again: answered from the cache, nothing encoded, identical bytes.
    let again = send(&f, vec![image(png)]).await.unwrap().unwrap();
    assert_eq!(again.embeddings, first.embeddings);
    let s = stats(&f).await;
    assert_eq!((s.batches, s.images_encoded), (1, 1), "{s:?}");
    assert_eq!((s.cache_queries, s.cache_hits), (2, 1), "{s:?}");

    // Cached and new images in one request: only the new one is encoded, and an image twice
    // in one batch is encoded once.
    let mixed = send(&f, vec![image(dcm), image(png), image(dcm)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mixed.embeddings[1], first.embeddings[0]);
    assert_eq!(mixed.embeddings[0], mixed.embeddings[2]);
    let d = max_abs_diff(&values(&mixed.embeddings[0]), &alone(dcm));
    assert!(d <= TOL, "the DICOM differs by {d}");
    let s = stats(&f).await;
    assert_eq!(
        (s.batches, s.last_batch_images, s.images_encoded),
        (2, 1, 2),
        "{s:?}"
    );
    assert_eq!(
        (s.cache_queries, s.cache_hits, s.cache_entries),
        (5, 3, 2),
        "{s:?}"
    );

    // Another frame of the same bytes is another key: not served from the cache (a PNG has
    // only frame 0, so the decoder refuses it).
    let mut frame_1 = image(png);
    frame_1.dicom_frame = Some(1);
    let status = send(&f, vec![frame_1]).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert_eq!(stats(&f).await.cache_hits, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_a_repeated_image_is_encoded_again() {
    let f = start(settings(8, 0, 8)).await;
    let png = &images()[0].1;
    let a = send(&f, vec![image(png)]).await.unwrap().unwrap();
    let b = send(&f, vec![image(png)]).await.unwrap().unwrap();
    assert_eq!(a.embeddings, b.embeddings);
    let s = stats(&f).await;
    assert_eq!((s.batches, s.images_encoded), (2, 2), "{s:?}");
    assert_eq!((s.cache_queries, s.cache_hits, s.cache_entries), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_with_retry_info() {
    let capacity = 2;
    let f = start(settings(4, 0, capacity)).await;
    let imgs = images();
    let hold = f.service.hold();
    // One request at a time until one is refused: the queue holds `capacity`, the held
    // encoder at most one more, so the fourth is refused at the latest.
    let mut accepted = Vec::new();
    let mut refused = None;
    for (_, bytes) in imgs.iter().cycle().take(capacity + 2) {
        let call = send(&f, vec![image(bytes)]);
        let want = accepted.len() + 1;
        wait_for("the request to be queued or refused", || {
            f.service.stats().waiting == want || call.is_finished()
        })
        .await;
        if call.is_finished() {
            refused = Some(call.await.unwrap().unwrap_err());
            break;
        }
        accepted.push(call);
    }
    let status = refused.expect("a request beyond the queue was refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(
        medgemma_rpc::is_overloaded(&status),
        "no RetryInfo: {status}"
    );
    assert!(
        (capacity..=capacity + 1).contains(&accepted.len()),
        "{} accepted",
        accepted.len()
    );
    drop(hold);
    // Every accepted request is answered, in one batch.
    let n = accepted.len() as u32;
    for call in accepted {
        call.await.unwrap().unwrap();
    }
    let s = stats(&f).await;
    assert_eq!((s.batches, s.largest_batch_images), (1, n), "{s:?}");
    assert_eq!(s.queue_capacity, capacity as u32);
}
