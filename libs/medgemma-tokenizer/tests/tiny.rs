//! Hermetic tests on a tiny Gemma-shaped tokenizer (tests/data/tiny, made by make_tiny.py) and
//! the real Gemma 3 chat template copied into its tokenizer_config.json.

mod common;

use std::path::PathBuf;

use medgemma_tokenizer::{
    ChatMessage, ChatTemplate, ContentPart, ImageTokens, IncrementalDecoder, TemplateOrigin,
    Tokenizer, TokenizerError, count_image_tokens, expand_image_placeholders,
};

fn tiny_dir() -> PathBuf {
    common::data_dir().join("tiny")
}

fn tiny() -> Tokenizer {
    Tokenizer::from_path(tiny_dir()).expect("tiny tokenizer")
}

fn tiny_gguf_metadata() -> serde_json::Value {
    let text = std::fs::read_to_string(tiny_dir().join("gguf_metadata.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tiny_from_gguf() -> Tokenizer {
    Tokenizer::from_gguf(&common::gguf_from_json(&tiny_gguf_metadata())).expect("tiny GGUF")
}

const SAMPLES: &[&str] = &[
    "hello the model",
    "  hello    the user   ",
    "病患主訴胸悶三天。",
    "呼吸困難，龘 x-ray",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>hello\n\n\n\nthe\n\n\n\n\n\n\nend",
    "unknown ÿ 😀 bytes",
];

#[test]
fn from_path_accepts_directory_or_file() {
    let from_dir = tiny();
    let from_file = Tokenizer::from_path(tiny_dir().join("tokenizer.json")).unwrap();
    assert_eq!(from_dir.vocab_size(), 341);
    assert_eq!(from_file.vocab_size(), 341);
    assert_eq!(from_file.bos_id(), Some(2));
    assert!(from_file.chat_template().is_some());
}

#[test]
fn from_path_missing_file_names_it() {
    let dir = common::data_dir().join("no-such-dir");
    let err = Tokenizer::from_path(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

#[test]
fn special_ids_come_from_config() {
    let tok = tiny();
    assert_eq!(tok.bos_id(), Some(2));
    // eos_token (<end_of_turn>) first, then <eos>.
    assert_eq!(tok.eos_ids(), &[5, 1]);
    assert!(tok.is_eos(5) && tok.is_eos(1) && !tok.is_eos(2));
    assert_eq!(tok.token_to_id("<image_soft_token>"), Some(340));
    assert_eq!(tok.id_to_token(4).as_deref(), Some("<start_of_turn>"));
    assert!(tok.add_bos_token());
}

#[test]
fn encode_adds_exactly_one_bos() {
    let tok = tiny();
    let plain = tok.encode("hello", true).unwrap();
    assert_eq!(plain[0], 2);
    assert_eq!(plain.iter().filter(|&&i| i == 2).count(), 1);
    assert_eq!(tok.encode("hello", false).unwrap(), plain[1..]);
    let already = tok.encode("<bos>hello", true).unwrap();
    assert_eq!(already, plain);
    assert!(tok.encode("", false).unwrap().is_empty());
    assert_eq!(tok.encode("", true).unwrap(), vec![2]);
}

#[test]
fn special_tokens_in_text_are_single_ids() {
    let tok = tiny();
    let ids = tok
        .encode("<start_of_turn>user\nhello<end_of_turn>", false)
        .unwrap();
    let mut expected = vec![4];
    expected.extend(tok.encode("user", false).unwrap());
    expected.push(tok.token_to_id("\n").unwrap());
    expected.extend(tok.encode("hello", false).unwrap());
    expected.push(5);
    assert_eq!(ids, expected);
}

#[test]
fn decode_round_trips_and_skips_special() {
    let tok = tiny();
    for text in SAMPLES {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(&tok.decode(&ids, false).unwrap(), text);
    }
    let ids = tok
        .encode("<start_of_turn>model\nhello<end_of_turn>", true)
        .unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "model\nhello");
}

#[test]
fn decode_rejects_ids_outside_vocabulary() {
    let tok = tiny();
    let err = tok.decode(&[7, 341], false).unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::InvalidTokenId {
                id: 341,
                vocab_size: 341
            }
        ),
        "{err}"
    );
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let json = tiny();
    let gguf = tiny_from_gguf();
    assert_eq!(gguf.vocab_size(), 340);
    assert_eq!(gguf.bos_id(), Some(2));
    assert_eq!(gguf.eos_ids(), &[1, 5]);
    assert!(gguf.chat_template().is_none());
    for text in SAMPLES {
        let a = json.encode(text, true).unwrap();
        let b = gguf.encode(text, true).unwrap();
        assert_eq!(a, b, "sample {text:?}");
        assert_eq!(
            json.decode(&a, false).unwrap(),
            gguf.decode(&b, false).unwrap()
        );
    }
    // Same merges, in the same order, and the same vocabulary.
    let merges = |t: &Tokenizer| {
        let v: serde_json::Value = serde_json::from_str(&t.to_json().unwrap()).unwrap();
        (v["model"]["merges"].clone(), v["model"]["vocab"].clone())
    };
    assert_eq!(merges(&json), merges(&gguf));
}

#[test]
fn gguf_space_runs_are_respelled() {
    let gguf = tiny_from_gguf();
    assert_eq!(gguf.token_to_id("\u{2581}\u{2581}"), Some(9));
    assert_eq!(
        gguf.token_to_id("\u{2581}\u{2581}\u{2581}\u{2581}"),
        tiny().token_to_id("\u{2581}\u{2581}\u{2581}\u{2581}")
    );
    let ids = gguf.encode("a    b", false).unwrap();
    assert_eq!(gguf.decode(&ids, false).unwrap(), "a    b");
}

#[test]
fn gguf_errors_name_the_key() {
    let mut meta = tiny_gguf_metadata();
    meta["tokenizer.ggml.model"] = "gpt2".into();
    let err = Tokenizer::from_gguf(&common::gguf_from_json(&meta)).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");

    let mut meta = tiny_gguf_metadata();
    meta.as_object_mut()
        .unwrap()
        .remove("tokenizer.ggml.tokens");
    let err = Tokenizer::from_gguf(&common::gguf_from_json(&meta)).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");

    let mut meta = tiny_gguf_metadata();
    meta["tokenizer.ggml.scores"] = serde_json::json!([0.0, 1.0]);
    let err = Tokenizer::from_gguf(&common::gguf_from_json(&meta)).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.scores"), "{err}");

    let mut meta = tiny_gguf_metadata();
    meta["tokenizer.ggml.bos_token_id"] = 100_000.into();
    let err = Tokenizer::from_gguf(&common::gguf_from_json(&meta)).unwrap_err();
    assert!(err.to_string().contains("bos_token_id"), "{err}");

    let mut meta = tiny_gguf_metadata();
    meta["tokenizer.ggml.tokens"][20] = "<pad>".into();
    let err = Tokenizer::from_gguf(&common::gguf_from_json(&meta)).unwrap_err();
    assert!(err.to_string().contains("same piece"), "{err}");
}

#[test]
fn gguf_chat_template_is_read() {
    let mut meta = tiny_gguf_metadata();
    meta["tokenizer.chat_template"] = "{{ bos_token }}{{ messages[0]['role'] }}".into();
    let tok = Tokenizer::from_gguf(&common::gguf_from_json(&meta)).unwrap();
    let template = tok.chat_template().unwrap();
    assert_eq!(template.origin(), &TemplateOrigin::Gguf);
    assert_eq!(
        template.render(&[ChatMessage::user("x")], false).unwrap(),
        "<bos>user"
    );
}

fn gemma_template() -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(tiny_dir().join("tokenizer_config.json")).unwrap()
}

const SYSTEM: &str = "你是一位謹慎的臨床助理。";
const USER_ZH: &str = "病患主訴胸悶及呼吸困難三天，請摘要。";

#[test]
fn chat_template_folds_system_into_first_user_turn() {
    let rendered = gemma_template()
        .render(
            &[ChatMessage::system(SYSTEM), ChatMessage::user(USER_ZH)],
            true,
        )
        .unwrap();
    assert_eq!(
        rendered,
        format!(
            "<bos><start_of_turn>user\n{SYSTEM}\n\n{USER_ZH}<end_of_turn>\n<start_of_turn>model\n"
        )
    );
    let without_prompt = gemma_template()
        .render(&[ChatMessage::user(USER_ZH)], false)
        .unwrap();
    assert_eq!(
        without_prompt,
        format!("<bos><start_of_turn>user\n{USER_ZH}<end_of_turn>\n")
    );
}

#[test]
fn chat_template_multi_turn_trims_and_renames_assistant() {
    let rendered = gemma_template()
        .render(
            &[
                ChatMessage::user("  first question \n"),
                ChatMessage::assistant("an answer\n\n"),
                ChatMessage::user("second"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        rendered,
        "<bos><start_of_turn>user\nfirst question<end_of_turn>\n<start_of_turn>model\nan \
         answer<end_of_turn>\n<start_of_turn>user\nsecond<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn chat_template_renders_images_as_boi() {
    let message = ChatMessage::new(
        "user",
        vec![
            ContentPart::Image,
            ContentPart::Text("Describe the chest X-ray.".into()),
        ],
    );
    assert_eq!(message.image_count(), 1);
    let rendered = gemma_template().render(&[message], true).unwrap();
    assert_eq!(
        rendered,
        "<bos><start_of_turn>user\n<start_of_image>Describe the chest \
         X-ray.<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn chat_template_rejects_bad_role_order() {
    for messages in [
        vec![ChatMessage::user("a"), ChatMessage::user("b")],
        vec![ChatMessage::assistant("a")],
        vec![
            ChatMessage::system("s"),
            ChatMessage::user("a"),
            ChatMessage::user("b"),
        ],
    ] {
        let err = gemma_template().render(&messages, true).unwrap_err();
        let TokenizerError::ConversationRejected(message) = &err else {
            panic!("expected ConversationRejected, got {err}");
        };
        assert!(message.contains("alternate"), "{message}");
    }
}

#[test]
fn chat_template_errors_do_not_leak_the_conversation() {
    let template = ChatTemplate::new(
        "{{ messages[0]['content'] + 1 }}",
        "<bos>",
        "<eos>",
        TemplateOrigin::Inline,
    )
    .unwrap();
    let err = template
        .render(&[ChatMessage::user("SECRET-PATIENT-NAME")], false)
        .unwrap_err();
    assert!(matches!(err, TokenizerError::Template { .. }), "{err}");
    assert!(!format!("{err} {err:?}").contains("SECRET"), "{err}");

    let err = ChatTemplate::new("{% if %}", "", "", TemplateOrigin::Inline).unwrap_err();
    assert!(matches!(err, TokenizerError::Template { .. }), "{err}");
}

#[test]
fn rendered_prompt_encodes_with_one_bos() {
    let tok = tiny();
    let rendered = tok
        .chat_template()
        .unwrap()
        .render(
            &[ChatMessage::system(SYSTEM), ChatMessage::user(USER_ZH)],
            true,
        )
        .unwrap();
    let ids = tok.encode(&rendered, true).unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), rendered);
}

#[test]
fn content_parts_serialize_to_hf_shapes() {
    let message = ChatMessage::new(
        "user",
        vec![ContentPart::Image, ContentPart::Text("hi".into())],
    );
    let json = serde_json::to_value(&message).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]})
    );
    let back: ChatMessage = serde_json::from_value(json).unwrap();
    assert_eq!(back, message);
}

#[test]
fn gemma3_default_reports_its_path() {
    // A cache directory laid out like the real one, holding the tiny config.
    let cache =
        std::env::temp_dir().join(format!("medgemma-tokenizer-test-{}", std::process::id()));
    let target = ChatTemplate::gemma3_default_path(&cache);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(tiny_dir().join("tokenizer_config.json"), &target).unwrap();
    let template = ChatTemplate::gemma3_default(&cache).unwrap();
    assert_eq!(
        template.fallback_notice().unwrap(),
        format!("using the Gemma 3 chat template from {}", target.display())
    );
    assert_eq!(template.bos_token(), "<bos>");
    std::fs::remove_dir_all(&cache).unwrap();

    let err = ChatTemplate::gemma3_default(&cache).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    assert!(gemma_template().fallback_notice().is_none());
}

#[test]
fn image_placeholders_expand_like_gemma3_processor() {
    let tok = tiny();
    let image = tok.image_tokens(4).unwrap();
    assert_eq!((image.boi_id, image.image_id, image.eoi_id), (11, 340, 12));
    let same = ImageTokens::from_ids(&tok, 11, 340, 12, 4).unwrap();
    assert_eq!(same, image);

    let prompt = "<bos><start_of_turn>user\n<start_of_image>hello<end_of_turn>\n";
    let expanded = image.expand(prompt, 1).unwrap();
    let sequence = format!(
        "\n\n<start_of_image>{}<end_of_image>\n\n",
        "<image_soft_token>".repeat(4)
    );
    assert_eq!(
        expanded,
        format!("<bos><start_of_turn>user\n{sequence}hello<end_of_turn>\n")
    );
    assert_eq!(
        expand_image_placeholders(
            prompt,
            "<start_of_image>",
            "<image_soft_token>",
            "<end_of_image>",
            4
        ),
        expanded
    );
    let ids = tok.encode(&expanded, true).unwrap();
    assert_eq!(count_image_tokens(&ids, 340), 4);
    image.check_ids(&ids, 1).unwrap();
    // "user\n" + "\n\n" is one "\n\n\n" token, as in the reference.
    let triple = tok.token_to_id("\n\n\n").unwrap();
    assert!(ids.windows(2).any(|w| w == [triple, 11]), "{ids:?}");
    assert!(image.check_ids(&ids, 2).is_err());
    assert!(image.expand(prompt, 2).is_err());

    let two = image.expand("<start_of_image><start_of_image>", 2).unwrap();
    image
        .check_ids(&tok.encode(&two, true).unwrap(), 2)
        .unwrap();
}

#[test]
fn image_placeholders_with_pan_and_scan_crops() {
    let tok = tiny();
    let image = tok.image_tokens(2).unwrap();
    let sequence = image.sequence();
    let expanded = image.expand_with_crops("a<start_of_image>b", &[2]).unwrap();
    assert_eq!(
        expanded,
        format!(
            "aHere is the original image {sequence} and here are some crops to help you see \
             better {sequence} {sequence}b"
        )
    );
    image
        .check_ids(&tok.encode(&expanded, true).unwrap(), 3)
        .unwrap();
}

#[test]
fn image_check_rejects_broken_runs() {
    let tok = tiny();
    let image = tok.image_tokens(2).unwrap();
    // Two image tokens, but not framed by BOI/EOI.
    let err = image.check_ids(&[2, 340, 340, 12], 1).unwrap_err();
    assert!(matches!(err, TokenizerError::ImagePlaceholders(_)), "{err}");
    image.check_ids(&[2, 11, 340, 340, 12], 1).unwrap();
    assert!(tok.image_tokens(2).is_ok());
    assert!(tiny_from_gguf().image_tokens(2).is_err());
}

fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> (String, usize) {
    let mut decoder = IncrementalDecoder::new(skip_special);
    let mut out = String::new();
    let mut deltas = 0;
    for &id in ids {
        if let Some(delta) = decoder.push(tok, id).unwrap() {
            assert!(!delta.contains('\u{FFFD}'), "broken UTF-8 in a delta");
            out.push_str(&delta);
            deltas += 1;
        }
    }
    if let Some(rest) = decoder.finish(tok).unwrap() {
        out.push_str(&rest);
    }
    (out, deltas)
}

#[test]
fn incremental_decoder_waits_for_whole_characters() {
    let tok = tiny();
    // 龘 and 😀 are not in the tiny vocabulary: byte fallback, 3 and 4 byte pieces.
    let ids = tok.encode("病患龘x😀", false).unwrap();
    assert!(ids.len() >= 9, "{ids:?}");
    let mut decoder = IncrementalDecoder::new(true);
    let mut deltas = Vec::new();
    for &id in &ids {
        if let Some(d) = decoder.push(&tok, id).unwrap() {
            deltas.push(d);
        }
    }
    assert_eq!(deltas, vec!["病患", "龘", "x", "😀"]);
    assert_eq!(decoder.finish(&tok).unwrap(), None);
}

#[test]
fn incremental_decoder_matches_decode_of_all() {
    let tok = tiny();
    for text in SAMPLES {
        let ids = tok.encode(text, true).unwrap();
        for skip in [true, false] {
            let (streamed, _) = stream(&tok, &ids, skip);
            assert_eq!(streamed, tok.decode(&ids, skip).unwrap(), "{text:?}");
        }
    }
}

#[test]
fn incremental_decoder_flushes_incomplete_bytes_on_finish() {
    let tok = tiny();
    let e9 = tok.token_to_id("<0xE9>").unwrap();
    let mut decoder = IncrementalDecoder::new(false);
    assert_eq!(decoder.push(&tok, e9).unwrap(), None);
    assert_eq!(decoder.finish(&tok).unwrap().as_deref(), Some("\u{FFFD}"));
    // After finish the decoder starts afresh.
    let h = tok.token_to_id("hello").unwrap();
    assert_eq!(decoder.push(&tok, h).unwrap().as_deref(), Some("hello"));
    // An id past the vocabulary (a larger output head) gives no text and no error, and the
    // stream goes on.
    assert_eq!(decoder.push(&tok, 100_000).unwrap(), None);
    assert_eq!(decoder.push(&tok, h).unwrap().as_deref(), Some("hello"));
}
