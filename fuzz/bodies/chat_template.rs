//! Arbitrary conversations through the Gemma 3 chat template (`tokenizer`'s, the tiny
//! fixture's copy): rendered or refused, never a panic.

use medgemma_tokenizer::{ChatMessage, ContentPart, Tokenizer};

pub fn run(tokenizer: &Tokenizer, data: &[u8]) {
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
    if let Some(template) = tokenizer.chat_template()
        && let Ok(text) = template.render(&messages, true)
    {
        let _ = tokenizer.encode(&text, false);
    }
}
