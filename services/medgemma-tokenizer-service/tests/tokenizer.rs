//! The tokenizer service in-process on 127.0.0.1:0 with the real Gemma 3 tokenizer (skipped
//! when the demo assets are absent, unless MEDGEMMA_REQUIRE_ASSETS=1).

use std::sync::OnceLock;

use medgemma_proto::tokenizer::v1 as pb;
use medgemma_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use medgemma_rpc::ServeOptions;
use medgemma_rpc::client::{self, ReflectionVersion};
use medgemma_tokenizer_service::{SERVICE_NAME, TokenizerArgs, TokenizerService};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// The real Gemma 3 tokenizer (the demo's), loaded once for every test of this binary.
fn service() -> Option<TokenizerService> {
    static SERVICE: OnceLock<Option<TokenizerService>> = OnceLock::new();
    SERVICE
        .get_or_init(|| {
            let paths = medgemma_assets::demo_assets_for_test()?;
            let args = TokenizerArgs {
                listen: "127.0.0.1:0".into(),
                tokenizer: Some(paths.tokenizer_dir),
                model: None,
                cache_dir: None,
                tokens_per_image: 256,
                drain_timeout_s: 1,
                tls: Default::default(),
            };
            Some(args.load().unwrap())
        })
        .clone()
}

async fn start() -> Option<(
    TokenizerClient<Channel>,
    Channel,
    tokio::sync::oneshot::Sender<()>,
)> {
    let service = service()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = medgemma_tokenizer_service::serve(
        service,
        "127.0.0.1:0",
        async {
            let _ = stopped.await;
        },
        ServeOptions::default(),
    )
    .await
    .unwrap();
    let channel = client::connect(&running.local_addr.to_string())
        .await
        .unwrap();
    Some((TokenizerClient::new(channel.clone()), channel, stop))
}

fn text(t: &str) -> pb::ContentPart {
    pb::ContentPart {
        kind: Some(pb::content_part::Kind::Text(t.into())),
    }
}

fn image() -> pb::ContentPart {
    pb::ContentPart {
        kind: Some(pb::content_part::Kind::Image(pb::ImagePlaceholder {})),
    }
}

fn message(role: &str, parts: Vec<pb::ContentPart>) -> pb::ChatMessage {
    pb::ChatMessage {
        role: role.into(),
        parts,
    }
}

fn fields(status: &tonic::Status) -> Vec<String> {
    medgemma_rpc::field_violations(status)
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[tokio::test]
async fn serving_health_and_reflection() {
    let Some((mut tok, channel, _stop)) = start().await else {
        return;
    };
    assert_eq!(
        client::health_status(channel.clone(), SERVICE_NAME)
            .await
            .unwrap(),
        ServingStatus::Serving
    );
    for version in [ReflectionVersion::V1, ReflectionVersion::V1Alpha] {
        let names = client::list_services(channel.clone(), version)
            .await
            .unwrap();
        assert!(names.contains(&SERVICE_NAME.to_owned()), "{names:?}");
    }
    let info = tok.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.vocab_size, 262_145);
    assert_eq!(info.bos_token_id, Some(2));
    assert!(info.eos_token_ids.contains(&106));
    assert!(info.has_image_tokens);
}

#[tokio::test]
async fn encode_decode_round_trip_and_count() {
    let Some((mut tok, _channel, _stop)) = start().await else {
        return;
    };
    let note = "Patient: 67 y/o, 發燒 38.5°C, BP 142/90 — 懷疑肺炎 🫁";
    let ids = tok
        .encode(pb::EncodeRequest {
            text: note.into(),
            add_special_tokens: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(ids[0], 2, "BOS added");
    let back = tok
        .decode(pb::DecodeRequest {
            ids: ids.clone(),
            skip_special_tokens: true,
        })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(back, note);
    let count = tok
        .count_tokens(pb::CountTokensRequest {
            text: note.into(),
            add_special_tokens: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count as usize, ids.len());
}

#[tokio::test]
async fn chat_renders_with_the_gemma3_template_and_images_expand() {
    let Some((mut tok, _channel, _stop)) = start().await else {
        return;
    };
    let rendered = tok
        .render_chat(pb::RenderChatRequest {
            messages: vec![
                message("system", vec![text("You are a radiologist.")]),
                message("user", vec![image(), text("Describe this X-ray.")]),
            ],
            add_generation_prompt: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rendered.image_count, 1);
    assert_eq!(
        rendered.text,
        "<bos><start_of_turn>user\nYou are a radiologist.\n\n<start_of_image>Describe this \
         X-ray.<end_of_turn>\n<start_of_turn>model\n"
    );
    let layout = tok
        .image_layout(pb::ImageLayoutRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            layout.boi_token_id,
            layout.image_token_id,
            layout.eoi_token_id
        ),
        (255_999, 262_144, 256_000)
    );
    assert_eq!(layout.tokens_per_image, 256);
    let encoded = tok
        .encode(pb::EncodeRequest {
            text: rendered.text,
            add_special_tokens: false,
            image_count: 1,
            tokens_per_image: None,
        })
        .await
        .unwrap()
        .into_inner();
    let ids = &encoded.ids;
    assert_eq!(
        ids.iter().filter(|&&id| id == 2).count(),
        1,
        "exactly one BOS"
    );
    assert_eq!(encoded.image_spans.len(), 1);
    let span = &encoded.image_spans[0];
    assert_eq!(span.length, 256);
    let start = span.start as usize;
    assert_eq!(ids[start - 1], layout.boi_token_id);
    assert!(
        ids[start..start + 256]
            .iter()
            .all(|&id| id == layout.image_token_id)
    );
    assert_eq!(ids[start + 256], layout.eoi_token_id);
    // A smaller soft-token count on request.
    let small = tok
        .encode(pb::EncodeRequest {
            text: "<start_of_image>".into(),
            add_special_tokens: true,
            image_count: 1,
            tokens_per_image: Some(4),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(small.image_spans[0].length, 4);
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_with_field_violations() {
    let Some((mut tok, _channel, _stop)) = start().await else {
        return;
    };
    let err = tok
        .decode(pb::DecodeRequest {
            ids: vec![2, 999_999_999],
            skip_special_tokens: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), ["ids[1]"]);

    let err = tok
        .render_chat(pb::RenderChatRequest {
            messages: vec![],
            add_generation_prompt: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), ["messages"]);

    let err = tok
        .render_chat(pb::RenderChatRequest {
            messages: vec![
                message("user", vec![text("a")]),
                message("user", vec![text("b")]),
            ],
            add_generation_prompt: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "roles must alternate");
    assert_eq!(fields(&err), ["messages"]);

    let err = tok
        .render_chat(pb::RenderChatRequest {
            messages: vec![
                message("doctor", vec![text("a")]),
                message("user", vec![pb::ContentPart { kind: None }]),
            ],
            add_generation_prompt: true,
        })
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["messages[0].role", "messages[1].parts[0]"]);

    let err = tok
        .encode(pb::EncodeRequest {
            text: "one <start_of_image> only".into(),
            add_special_tokens: true,
            image_count: 2,
            tokens_per_image: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), ["image_count"]);
    // The message names counts, never the text.
    assert!(!err.message().contains("one"), "{}", err.message());

    let err = tok
        .image_layout(pb::ImageLayoutRequest {
            tokens_per_image: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["tokens_per_image"]);
}
