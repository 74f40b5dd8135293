//! Typed outputs: the JSON schemas the generator decodes to, and the parse back into fields.
//!
//! The generator's constrained decoding guarantees every output is a prefix of a JSON value that
//! matches the schema. When generation ends on the token budget, that prefix is incomplete:
//! [`complete_json_prefix`] closes it (an open string value keeps its text) so the typed fields
//! always parse, and the response says `FINISH_REASON_LENGTH`.

use serde::Deserialize;
use serde_json::{Value, json};

/// Longest chief complaint, in characters.
const CHIEF_COMPLAINT_MAX: u32 = 300;
/// Longest diagnosis, in characters.
const DIAGNOSIS_MAX: u32 = 200;
/// Most diagnoses.
const DIAGNOSES_MAX_ITEMS: u32 = 10;
/// Longest treatment plan, in characters.
const TREATMENT_PLAN_MAX: u32 = 1000;
/// Longest follow-up, in characters.
const FOLLOW_UP_MAX: u32 = 600;
/// Longest technique section, in characters.
const TECHNIQUE_MAX: u32 = 300;
/// Longest findings section, in characters.
const FINDINGS_MAX: u32 = 2000;
/// Longest impression section, in characters.
const IMPRESSION_MAX: u32 = 1000;

fn text_field(max: u32) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max})
}

/// The schema of a clinical-note summary.
pub fn summary_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "chief_complaint": text_field(CHIEF_COMPLAINT_MAX),
            "diagnoses": {
                "type": "array",
                "items": text_field(DIAGNOSIS_MAX),
                "minItems": 1,
                "maxItems": DIAGNOSES_MAX_ITEMS,
            },
            "treatment_plan": text_field(TREATMENT_PLAN_MAX),
            "follow_up": text_field(FOLLOW_UP_MAX),
        },
        "required": ["chief_complaint", "diagnoses", "treatment_plan", "follow_up"],
        "additionalProperties": false,
    })
}

/// The schema of a radiology report draft.
pub fn report_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "technique": text_field(TECHNIQUE_MAX),
            "findings": text_field(FINDINGS_MAX),
            "impression": text_field(IMPRESSION_MAX),
        },
        "required": ["technique", "findings", "impression"],
        "additionalProperties": false,
    })
}

/// The typed fields of a summary; missing fields (a truncated output) are empty.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub chief_complaint: String,
    pub diagnoses: Vec<String>,
    pub treatment_plan: String,
    pub follow_up: String,
}

/// The typed fields of a radiology report; missing fields (a truncated output) are empty.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Report {
    pub technique: String,
    pub findings: String,
    pub impression: String,
}

/// Parses generated text as `T`, completing a truncated JSON prefix first. Never fails: what
/// cannot be read stays at its default (empty).
pub fn parse_lenient<T: for<'de> Deserialize<'de> + Default>(text: &str) -> T {
    let text = text.trim();
    if let Ok(v) = serde_json::from_str::<T>(text) {
        return v;
    }
    let completed = complete_json_prefix(text);
    serde_json::from_str::<Value>(&completed)
        .ok()
        .map(strip_nulls)
        .and_then(|v| serde_json::from_value::<T>(v).ok())
        .unwrap_or_default()
}

/// Drops `null` members (a value cut off before it started) so `#[serde(default)]` fills them.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.into_iter()
                .filter(|v| !v.is_null())
                .map(strip_nulls)
                .collect(),
        ),
        other => other,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// In an object; `true` while the next string is a key.
    Object {
        expect_key: bool,
    },
    Array,
}

fn closers(stack: &[Frame]) -> String {
    stack
        .iter()
        .rev()
        .map(|f| match f {
            Frame::Object { .. } => '}',
            Frame::Array => ']',
        })
        .collect()
}

/// Turns a prefix of a JSON value into a complete JSON text: an open string value is closed
/// (keeping its text, minus a cut escape sequence), a dangling key, colon, comma or partial
/// literal is dropped, and open arrays and objects are closed. A complete value comes back
/// unchanged.
pub fn complete_json_prefix(s: &str) -> String {
    let mut stack: Vec<Frame> = Vec::new();
    // The longest prefix known to be complete once `closers(stack)` is appended.
    let mut safe: Option<(usize, Vec<Frame>)> = None;
    let mut in_string = false;
    let mut string_is_key = false;
    let mut escape_start: Option<usize> = None;
    let chars = s.char_indices();
    let mut in_literal = false;

    // Called when a value just ended at byte `end` (exclusive).
    fn value_done(stack: &mut [Frame], safe: &mut Option<(usize, Vec<Frame>)>, end: usize) {
        if let Some(Frame::Object { expect_key }) = stack.last_mut() {
            *expect_key = true;
        }
        *safe = Some((end, stack.to_vec()));
    }

    for (i, c) in chars {
        if in_string {
            if let Some(start) = escape_start {
                // `\uXXXX` needs four hex digits after `u`.
                let taken = s[start..i + c.len_utf8()].len();
                let is_unicode = s[start..].starts_with("\\u");
                if !is_unicode || taken >= 6 {
                    escape_start = None;
                }
                continue;
            }
            match c {
                '\\' => escape_start = Some(i),
                '"' => {
                    in_string = false;
                    if string_is_key {
                        // A key alone is not a safe point.
                    } else {
                        value_done(&mut stack, &mut safe, i + 1);
                    }
                }
                _ => {}
            }
            continue;
        }
        if in_literal {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+') {
                continue;
            }
            in_literal = false;
            value_done(&mut stack, &mut safe, i);
        }
        match c {
            '{' => {
                stack.push(Frame::Object { expect_key: true });
                safe = Some((i + 1, stack.clone()));
            }
            '[' => {
                stack.push(Frame::Array);
                safe = Some((i + 1, stack.clone()));
            }
            '}' | ']' => {
                stack.pop();
                value_done(&mut stack, &mut safe, i + 1);
            }
            '"' => {
                in_string = true;
                string_is_key = matches!(stack.last(), Some(Frame::Object { expect_key: true }));
            }
            ':' => {
                if let Some(Frame::Object { expect_key }) = stack.last_mut() {
                    *expect_key = false;
                }
            }
            c if c.is_ascii_alphanumeric() || c == '-' => in_literal = true,
            _ => {}
        }
    }
    if in_literal && stack.is_empty() {
        // A literal at top level, complete or not: the caller's parse decides.
        return s.to_owned();
    }
    // A literal inside a container may be cut (`tr`): the last safe point leaves it out.
    if in_string && !string_is_key {
        let end = escape_start.unwrap_or(s.len());
        return format!("{}\"{}", &s[..end], closers(&stack));
    }
    match safe {
        Some((end, frames)) => format!("{}{}", &s[..end], closers(&frames)),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(s: &str) -> Summary {
        parse_lenient(s)
    }

    #[test]
    fn complete_values_are_unchanged() {
        for s in [
            r#"{"a": "b", "c": ["d", "e"]}"#,
            r#"{}"#,
            r#"[]"#,
            r#"{"a": {"b": []}}"#,
        ] {
            assert_eq!(complete_json_prefix(s), s);
        }
    }

    #[test]
    fn every_prefix_of_a_summary_parses() {
        let full = r#"{"chief_complaint": "胸悶 \"三天\" \u4e2d", "diagnoses": ["HFrEF", "高血壓"], "treatment_plan": "利尿劑\\n低鹽", "follow_up": "心臟科"}"#;
        let want: Summary = serde_json::from_str(full).unwrap();
        for (i, _) in full.char_indices().chain([(full.len(), ' ')]) {
            let prefix = &full[..i];
            let completed = complete_json_prefix(prefix);
            if !completed.is_empty() {
                serde_json::from_str::<Value>(&completed)
                    .unwrap_or_else(|e| panic!("{prefix:?} -> {completed:?}: {e}"));
            }
            let got = summary(prefix);
            // Each field is either complete, empty, or a prefix of the complete one.
            assert!(want.chief_complaint.starts_with(&got.chief_complaint));
            assert!(got.diagnoses.len() <= want.diagnoses.len());
            for (g, w) in got.diagnoses.iter().zip(&want.diagnoses) {
                assert!(w.starts_with(g.as_str()), "{g:?} vs {w:?}");
            }
            assert!(want.treatment_plan.starts_with(&got.treatment_plan));
            assert!(want.follow_up.starts_with(&got.follow_up));
        }
        assert_eq!(summary(full), want);
    }

    #[test]
    fn cut_value_string_keeps_its_text() {
        let r: Report = parse_lenient(r#"{"technique": "PA view", "findings": "Clear lu"#);
        assert_eq!(r.technique, "PA view");
        assert_eq!(r.findings, "Clear lu");
        assert_eq!(r.impression, "");
    }

    #[test]
    fn cut_escape_is_dropped() {
        let r: Report = parse_lenient(r#"{"technique": "a\u4e"#);
        assert_eq!(r.technique, "a");
        let r: Report = parse_lenient(r#"{"technique": "a\"#);
        assert_eq!(r.technique, "a");
    }

    #[test]
    fn garbage_gives_defaults() {
        assert_eq!(summary("not json at all"), Summary::default());
        assert_eq!(summary(""), Summary::default());
        assert_eq!(summary(r#"{"chief_complaint": 3}"#), Summary::default());
    }

    #[test]
    fn schemas_are_objects_with_every_field_required() {
        for (schema, n) in [(summary_schema(), 4), (report_schema(), 3)] {
            assert_eq!(schema["required"].as_array().unwrap().len(), n);
            assert_eq!(schema["properties"].as_object().unwrap().len(), n);
        }
    }
}
