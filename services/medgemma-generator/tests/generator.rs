//! The generator service in-process on 127.0.0.1:0 with the real demo model (skipped when the
//! demo assets are absent, unless MEDGEMMA_REQUIRE_ASSETS=1).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use medgemma_generator::{GeneratorConfig, RunningGenerator, SERVICE_NAME};
use medgemma_model::{Gemma3, LoadOptions};
use medgemma_proto::generation::v1 as pb;
use medgemma_proto::generation::v1::generator_client::GeneratorClient;
use medgemma_rpc::client::{self, ReflectionVersion};
use medgemma_test_support::server::{self, InProcess};
use medgemma_tokenizer::Tokenizer;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

type Loaded = (Arc<Gemma3>, Arc<Tokenizer>);

/// The demo model and its GGUF vocabulary, loaded once for every test of this binary.
fn demo() -> Option<&'static Loaded> {
    static LOADED: OnceLock<Option<Loaded>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let paths = medgemma_test_support::demo_assets()?;
            let model = Gemma3::load(&paths.gguf, &LoadOptions::default()).unwrap();
            let tokenizer = medgemma_generator::load_tokenizer(&paths.gguf, None).unwrap();
            Some((Arc::new(model), Arc::new(tokenizer)))
        })
        .as_ref()
}

struct Fixture {
    server: InProcess<RunningGenerator>,
    client: GeneratorClient<Channel>,
    channel: Channel,
}

/// The generator in process, its model not loaded yet.
async fn serve(config: GeneratorConfig) -> InProcess<RunningGenerator> {
    server::start(
        |listen, shutdown| medgemma_generator::serve(config, listen, shutdown),
        |r| r.local_addr,
    )
    .await
}

async fn start(config: GeneratorConfig) -> Option<Fixture> {
    let (model, tokenizer) = demo()?.clone();
    let server = serve(config).await;
    server.running.start(model, tokenizer).await.unwrap();
    let channel = server.channel.clone();
    let client = medgemma_rpc::with_limits!(GeneratorClient::new(channel.clone()));
    Some(Fixture {
        server,
        client,
        channel,
    })
}

fn config() -> GeneratorConfig {
    GeneratorConfig::new("gemma-3-270m-q4_k_m")
}

fn prompt(text: &str) -> Vec<u32> {
    demo().unwrap().1.encode(text, true).unwrap()
}

fn request(ids: Vec<u32>, max_new_tokens: u32, ignore_eos: bool) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt_ids: ids,
        sampling: Some(pb::SamplingParams {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }),
        ignore_eos,
        ..Default::default()
    }
}

/// Polls `Stats` until `done` holds, for at most `within`.
async fn wait_stats(
    client: &mut GeneratorClient<Channel>,
    within: Duration,
    done: impl Fn(&pb::StatsResponse) -> bool,
) -> pb::StatsResponse {
    let t = Instant::now();
    loop {
        let stats = client
            .stats(pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        if done(&stats) || t.elapsed() > within {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fields(status: &tonic::Status) -> Vec<String> {
    medgemma_rpc::field_violations(status)
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[tokio::test]
async fn health_goes_serving_after_load_and_reflection_lists_the_service() {
    let Some((model, tokenizer)) = demo().cloned() else {
        return;
    };
    let server = serve(config()).await;
    let (running, channel) = (&server.running, server.channel.clone());
    let mut client = GeneratorClient::new(channel.clone());
    assert_eq!(
        client::health_status(channel.clone(), SERVICE_NAME)
            .await
            .unwrap(),
        ServingStatus::NotServing
    );
    let err = client
        .generate(request(vec![2, 3], 1, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    running.start(model.clone(), tokenizer).await.unwrap();
    assert_eq!(
        client::health_status(channel.clone(), SERVICE_NAME)
            .await
            .unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        client::health_status(channel.clone(), "").await.unwrap(),
        ServingStatus::Serving
    );
    for version in [ReflectionVersion::V1, ReflectionVersion::V1Alpha] {
        let names = client::list_services(channel.clone(), version)
            .await
            .unwrap();
        assert!(
            names.contains(&SERVICE_NAME.to_owned()),
            "{version:?}: {names:?}"
        );
        assert!(names.contains(&"grpc.health.v1.Health".to_owned()));
        assert!(
            !names.iter().any(|n| n.contains("ClinicalTasks")),
            "only served services"
        );
    }
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_id, "gemma-3-270m-q4_k_m");
    assert_eq!(
        info.context_length as usize,
        model.config().text.max_position_embeddings
    );
    assert_eq!(info.vocab_size as usize, model.config().text.vocab_size);
    assert!(!info.accepts_image_embeddings);
    assert!(info.eos_token_ids.contains(&1) && info.eos_token_ids.contains(&106));
}

#[tokio::test]
async fn unary_and_stream_agree_for_greedy_decoding() {
    let Some(mut f) = start(config()).await else {
        return;
    };
    let ids = prompt("The patient presented with a fever and");
    let mut req = request(ids.clone(), 8, true);
    req.top_logprobs = Some(2);
    let unary = f.client.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(unary.token_ids.len(), 8);
    assert_eq!(unary.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(unary.model_id, "gemma-3-270m-q4_k_m");
    let usage = unary.usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, ids.len());
    assert_eq!(usage.completion_tokens, 8);
    assert_eq!(unary.logprobs.len(), 8);
    assert!(unary.timings.unwrap().prefill_ms > 0.0);

    let mut stream = f.client.generate_stream(req).await.unwrap().into_inner();
    let (mut text, mut tokens, mut last) = (String::new(), Vec::new(), None);
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            pb::generate_stream_response::Event::Delta(d) => {
                assert!(last.is_none(), "the full response comes last");
                text.push_str(&d.text);
                tokens.extend(d.token_ids);
                assert_eq!(d.logprobs.len(), 1);
            }
            pb::generate_stream_response::Event::Response(r) => last = Some(r),
        }
    }
    let last = last.expect("a final response");
    assert_eq!(tokens, unary.token_ids);
    assert_eq!(last.token_ids, unary.token_ids);
    assert_eq!(last.text, unary.text);
    assert_eq!(text, unary.text);

    // The model's own first-position logprobs for chosen ids: the greedy token's is its own.
    let first = unary.token_ids[0];
    let runner_up = unary.logprobs[0].top[1].token_id;
    let mut req = request(ids, 1, true);
    req.logprob_token_ids = vec![runner_up, first];
    let out = f.client.generate(req).await.unwrap().into_inner();
    let got = out.first_token_logprobs;
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].token_id, got[1].token_id), (runner_up, first));
    assert!((got[1].logprob - unary.logprobs[0].logprob).abs() < 1e-3);
    assert!(got[1].logprob >= got[0].logprob);
    assert_eq!(f.server.running.service.stats().active_sequences, 0);
}

#[tokio::test]
async fn a_cancelled_stream_stops_generation_and_frees_the_kv_cache() {
    let Some(mut f) = start(config()).await else {
        return;
    };
    let mut stream = f
        .client
        .generate_stream(request(prompt("Describe a chest X-ray."), 4000, true))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        stream.next().await.unwrap().unwrap();
    }
    let busy = f
        .client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(busy.active_sequences, 1);
    assert!(busy.kv_bytes_in_use > 0);
    drop(stream);
    let stats = wait_stats(&mut f.client, Duration::from_secs(1), |s| {
        s.active_sequences == 0
    })
    .await;
    assert_eq!(stats.active_sequences, 0, "cancelled within a second");
    assert_eq!(stats.kv_bytes_in_use, 0);
    assert_eq!(
        stats.requests_served, 1,
        "the warm-up is not counted; this one is"
    );
}

#[tokio::test]
async fn an_expired_deadline_gives_deadline_exceeded_and_frees_the_model() {
    let Some(mut f) = start(config()).await else {
        return;
    };
    let mut req = Request::new(request(prompt("Describe a chest X-ray."), 4000, true));
    req.set_timeout(Duration::from_millis(400));
    let t = Instant::now();
    // tonic's client enforces the deadline too (and calls it CANCELLED); the server stops on
    // its own either way, which the stats below show.
    let err = client::deadline_status(f.client.generate(req).await.unwrap_err());
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
    let stats = wait_stats(&mut f.client, Duration::from_secs(1), |s| {
        s.active_sequences == 0
    })
    .await;
    assert_eq!(stats.active_sequences, 0);
    assert_eq!(stats.kv_bytes_in_use, 0);

    // Streaming: the stream ends with DEADLINE_EXCEEDED.
    let mut req = Request::new(request(prompt("Describe a chest X-ray."), 4000, true));
    req.set_timeout(Duration::from_millis(400));
    let mut stream = f.client.generate_stream(req).await.unwrap().into_inner();
    let mut end = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends")
    {
        if let Err(e) = msg {
            end = Some(client::deadline_status(e).code());
            break;
        }
    }
    assert_eq!(end, Some(Code::DeadlineExceeded));
    let stats = wait_stats(&mut f.client, Duration::from_secs(1), |s| {
        s.active_sequences == 0
    })
    .await;
    assert_eq!(stats.active_sequences, 0);
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_and_queued_deadlines_expire() {
    let mut cfg = config();
    cfg.queue_capacity = 1;
    cfg.scheduler.max_running = 1;
    let Some(mut f) = start(cfg).await else {
        return;
    };
    let long = || request(prompt("Describe a chest X-ray."), 4000, true);
    // One generating...
    let mut running = f.client.generate_stream(long()).await.unwrap().into_inner();
    running.next().await.unwrap().unwrap();
    // ...one queued (it will expire there)...
    let mut queued_client = f.client.clone();
    let mut queued = Request::new(long());
    queued.set_timeout(Duration::from_millis(800));
    let queued = tokio::spawn(async move { queued_client.generate(queued).await });
    let stats = wait_stats(&mut f.client, Duration::from_secs(2), |s| {
        s.queue_depth == 1
    })
    .await;
    assert_eq!(
        (
            stats.active_sequences,
            stats.queue_depth,
            stats.queue_capacity
        ),
        (1, 1, 1)
    );
    // ...and the next is refused at once.
    let t = Instant::now();
    let err = f.client.generate(long()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        medgemma_rpc::is_overloaded(&err),
        "carries RetryInfo: {err:?}"
    );
    assert!(t.elapsed() < Duration::from_millis(500));

    let err = client::deadline_status(queued.await.unwrap().unwrap_err());
    assert_eq!(err.code(), Code::DeadlineExceeded);
    drop(running);
    let stats = wait_stats(&mut f.client, Duration::from_secs(2), |s| {
        s.active_sequences == 0 && s.queue_depth == 0
    })
    .await;
    assert_eq!((stats.active_sequences, stats.queue_depth), (0, 0));
    // The expired request was dropped from the queue, never run: the model is free at once.
    let out = f
        .client
        .generate(request(prompt("Hello"), 1, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.token_ids.len(), 1);
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_with_field_violations() {
    let Some(mut f) = start(config()).await else {
        return;
    };
    let info = f
        .client
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let ok = || request(prompt("Hello"), 2, false);
    let sampling = |s: pb::SamplingParams| {
        let mut r = ok();
        r.sampling = Some(s);
        r
    };
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (request(vec![], 2, false), "prompt_ids"),
        (request(vec![2, info.vocab_size], 2, false), "prompt_ids[1]"),
        (
            request(vec![2; info.context_length as usize], 2, false),
            "prompt_ids",
        ),
        (
            sampling(pb::SamplingParams {
                temperature: Some(f32::NAN),
                ..Default::default()
            }),
            "sampling.temperature",
        ),
        (
            sampling(pb::SamplingParams {
                temperature: Some(-0.5),
                ..Default::default()
            }),
            "sampling.temperature",
        ),
        (
            sampling(pb::SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            }),
            "sampling.top_p",
        ),
        (
            sampling(pb::SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            }),
            "sampling.top_p",
        ),
        (
            sampling(pb::SamplingParams {
                top_k: Some(0),
                ..Default::default()
            }),
            "sampling.top_k",
        ),
        (
            {
                let mut r = ok();
                r.top_logprobs = Some(1000);
                r
            },
            "top_logprobs",
        ),
        (
            {
                let mut r = ok();
                r.logprob_token_ids = vec![info.vocab_size + 7];
                r
            },
            "logprob_token_ids[0]",
        ),
        (
            {
                let mut r = ok();
                r.constraint = Some(pb::Constraint {
                    kind: Some(pb::constraint::Kind::JsonSchema("{not json".into())),
                });
                r
            },
            "constraint.json_schema",
        ),
        (
            {
                let mut r = ok();
                r.image_embeddings = vec![pb::ImageEmbedding {
                    data: vec![0; 4 * info.hidden_size as usize],
                    dtype: "f32".into(),
                    shape: vec![1, info.hidden_size],
                    sha256: String::new(),
                }];
                r
            },
            "image_embeddings",
        ),
    ];
    for (req, field) in cases {
        let err = f.client.generate(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            fields(&err).contains(&field.to_owned()),
            "{field}: {:?}",
            fields(&err)
        );
        // Streaming validates the same way, before anything is queued.
        let err = f.client.generate_stream(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field} (stream)");
    }
    // Several problems are reported together.
    let err = f
        .client
        .generate(pb::GenerateRequest {
            sampling: Some(pb::SamplingParams {
                temperature: Some(-1.0),
                top_p: Some(2.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let mut got = fields(&err);
    got.sort();
    assert_eq!(
        got,
        ["prompt_ids", "sampling.temperature", "sampling.top_p"]
    );
    let stats = f
        .client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.requests_served, 0,
        "bad requests never reach the queue"
    );
    let _ = &f.channel;
}

#[tokio::test]
async fn a_prompt_over_max_input_tokens_is_invalid_argument_naming_the_limit() {
    let mut cfg = config();
    cfg.scheduler.max_input_tokens = Some(8);
    let Some(mut f) = start(cfg).await else {
        return;
    };
    let err = f
        .client
        .generate(request(vec![2; 9], 1, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let v = medgemma_rpc::field_violations(&err);
    assert_eq!(fields(&err), vec!["prompt_ids".to_owned()]);
    assert!(
        v[0].description.contains("--max-input-tokens") && v[0].description.contains('8'),
        "{}",
        v[0].description
    );
    // At the limit it is served, and nothing is left held.
    let out = f
        .client
        .generate(request(vec![2; 8], 2, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.token_ids.len(), 2);
    let stats = wait_stats(&mut f.client, Duration::from_secs(2), |s| {
        s.active_sequences == 0 && s.kv_bytes_in_use == 0
    })
    .await;
    assert_eq!((stats.active_sequences, stats.kv_bytes_in_use), (0, 0));
    assert!(stats.steps >= 2 && stats.max_batch_size == 1, "{stats:?}");
}
