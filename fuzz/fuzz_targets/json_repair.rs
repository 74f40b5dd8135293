//! The gateway's truncation-safe JSON handling: `complete_json_prefix` closes every prefix of
//! a valid JSON document into valid JSON, and the typed parsing never panics on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medgemma_gateway::structured::{Report, Summary, complete_json_prefix, parse_lenient};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _: Summary = parse_lenient(&text);
    let _: Report = parse_lenient(&text);
    let _ = complete_json_prefix(&text);
    if text.len() <= 512 && serde_json::from_str::<serde_json::Value>(&text).is_ok() {
        for (cut, _) in text.char_indices() {
            let closed = complete_json_prefix(&text[..cut]);
            if !closed.trim().is_empty() {
                assert!(
                    serde_json::from_str::<serde_json::Value>(&closed).is_ok(),
                    "prefix {cut} of a valid document did not close into JSON"
                );
            }
        }
    }
});
