//! libFuzzer driver of `bodies/chat_template.rs` (its doc says what is checked), over the tiny
//! fixture's tokenizer; `scripts/fuzz.sh` runs it, and CI runs the same body over the seeds and
//! their mutations (`services/medgemma-suite/tests/fuzz_bodies.rs`).
#![no_main]

use std::sync::OnceLock;

use medgemma_tokenizer::Tokenizer;

#[path = "../bodies/chat_template.rs"]
mod body;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_path(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-27b-text"),
        )
        .expect("the fixture tokenizer")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(tokenizer(), data));
