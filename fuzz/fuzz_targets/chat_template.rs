//! Arbitrary conversations through the Gemma 3 chat template (the tiny fixture's copy):
//! rendered or refused, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use medgemma_tokenizer::{ChatMessage, ContentPart, Tokenizer};

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_path(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-27b-text"),
        )
        .expect("the fixture tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    // Messages separated by 0x00; the first byte of each picks the role and the part kinds.
    let messages: Vec<ChatMessage> = data
        .split(|&b| b == 0)
        .filter(|m| !m.is_empty())
        .map(|m| {
            let role = ["system", "user", "assistant", "tool"][usize::from(m[0] % 4)];
            let text = String::from_utf8_lossy(&m[1..]).into_owned();
            let content = if m[0] & 0x10 != 0 {
                vec![ContentPart::Image, ContentPart::Text(text)]
            } else {
                vec![ContentPart::Text(text)]
            };
            ChatMessage::new(role, content)
        })
        .collect();
    let tok = tokenizer();
    if let Some(template) = tok.chat_template()
        && let Ok(text) = template.render(&messages, true)
    {
        let _ = tok.encode(&text, false);
    }
});
