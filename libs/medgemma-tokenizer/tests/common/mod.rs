//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

/// `$MEDGEMMA_CACHE_DIR`, else `~/.cache/medgemma`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("MEDGEMMA_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/medgemma"),
    }
}

/// A file under the cache directory, or `None` (test skipped) when it is missing. With
/// `MEDGEMMA_REQUIRE_ASSETS=1` a missing file fails the test instead.
pub fn asset(relative: &str) -> Option<PathBuf> {
    let path = cache_dir().join(relative);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("MEDGEMMA_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!(
            "MEDGEMMA_REQUIRE_ASSETS=1 but {} is missing (fetch the demo assets into the cache \
             directory, or set MEDGEMMA_CACHE_DIR)",
            path.display()
        );
    }
    eprintln!("skipped: {} not found", path.display());
    None
}

/// This crate's `tests/data`.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The corpus lines, with `\n`, `\t` and `\\` unescaped.
pub fn corpus() -> Vec<String> {
    let text = std::fs::read_to_string(data_dir().join("corpus.txt")).expect("corpus.txt");
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut out = String::new();
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some('n') => out.push('\n'),
                        Some('t') => out.push('\t'),
                        Some('\\') => out.push('\\'),
                        other => panic!("bad escape \\{other:?} in corpus.txt"),
                    }
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect()
}

/// A GGUF `Content` holding only the metadata in a JSON object (strings, numbers, booleans and
/// arrays of them; integers become i32 in arrays and u32 alone, other numbers f32).
pub fn gguf_from_json(json: &serde_json::Value) -> Content {
    fn value(v: &serde_json::Value, in_array: bool) -> Value {
        match v {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match (n.as_i64(), in_array) {
                (Some(i), true) => Value::I32(i as i32),
                (Some(i), false) => Value::U32(i as u32),
                (None, _) => Value::F32(n.as_f64().unwrap() as f32),
            },
            serde_json::Value::Array(items) => {
                Value::Array(items.iter().map(|i| value(i, true)).collect())
            }
            other @ (serde_json::Value::Null | serde_json::Value::Object(_)) => {
                panic!("unsupported metadata value {other}")
            }
        }
    }
    let metadata = json
        .as_object()
        .expect("metadata object")
        .iter()
        .map(|(k, v)| (k.clone(), value(v, false)))
        .collect();
    Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    }
}
