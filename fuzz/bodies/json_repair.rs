//! The gateway's truncation-safe JSON handling: `complete_json_prefix` closes every prefix of
//! a valid JSON object or array into valid JSON (a bare scalar's prefix is returned as it is,
//! for the caller's parse to judge), and the typed parsing never panics on any text.

use medgemma_gateway::structured::{Report, Summary, complete_json_prefix, parse_lenient};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _: Summary = parse_lenient(&text);
    let _: Report = parse_lenient(&text);
    let _ = complete_json_prefix(&text);
    let container = matches!(text.trim_start().chars().next(), Some('{' | '['));
    if container && text.len() <= 512 && serde_json::from_str::<serde_json::Value>(&text).is_ok() {
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
}
