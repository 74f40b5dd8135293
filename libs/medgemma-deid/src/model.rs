//! The model pass: the LLM reads a window of the note and lists the identifiers it sees as JSON
//! under [`schema`] (constrained decoding, so it always parses); each listed string is checked
//! (it must be in the window and look like its type) and every occurrence of it in the note
//! becomes a finding. Long notes go in overlapping windows.
//!
//! The caller runs the model: [`deidentify_with_model`] takes a function from a prompt and a
//! schema to the model's JSON text, so this crate needs no runtime and no RPC.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::types::{Language, Mode, PhiType, Source, is_han};
use crate::{Deidentified, Finding, lexicon, render, resolve, rule_findings};

/// Characters per window.
pub const WINDOW_CHARS: usize = 1500;
/// Characters two neighbouring windows share (an identifier cut by one window's edge is whole
/// in the next).
pub const OVERLAP_CHARS: usize = 200;
/// The most identifiers one window's answer may list.
pub const MAX_ITEMS: usize = 48;
/// The longest identifier the model may list, in characters.
pub const MAX_ITEM_CHARS: usize = 120;
/// The confidence of a model finding.
pub const MODEL_CONFIDENCE: f32 = 0.6;

/// A window: a byte range of the note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// Windows of at most `size` characters covering `text`, each starting `overlap` characters
/// before the previous one ends; a window ends after a line break, sentence end or space when
/// one is near its end.
pub fn windows(text: &str, size: usize, overlap: usize) -> Vec<Window> {
    let size = size.max(2);
    let overlap = overlap.min(size / 2);
    let idx: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let n = idx.len() - 1;
    let mut out = Vec::new();
    let mut s = 0usize;
    loop {
        let mut e = (s + size).min(n);
        if e < n {
            // Prefer a break in the last quarter of the window.
            let floor = s + size * 3 / 4;
            let chars: Vec<char> = text[idx[floor]..idx[e]].chars().collect();
            if let Some(p) = chars
                .iter()
                .rposition(|&c| matches!(c, '\n' | '。' | '.' | '；' | ';'))
                .or_else(|| {
                    chars
                        .iter()
                        .rposition(|&c| c.is_whitespace() || c == '，' || c == ',')
                })
            {
                e = floor + p + 1;
            }
        }
        out.push(Window {
            start: idx[s],
            end: idx[e],
        });
        if e >= n {
            break;
        }
        s = e.saturating_sub(overlap).max(s + 1);
    }
    out
}

/// The JSON schema of one window's answer: a list of `{text, type}`.
pub fn schema() -> Value {
    let types: Vec<&str> = PhiType::ALL.iter().map(|t| t.as_str()).collect();
    json!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "text": {"type": "string", "minLength": 1, "maxLength": MAX_ITEM_CHARS},
                "type": {"type": "string", "enum": types},
            },
            "required": ["text", "type"],
            "additionalProperties": false,
        },
        "maxItems": MAX_ITEMS,
    })
}

/// The instruction and the window, as one user turn.
pub fn prompt(window: &str, language: Language) -> String {
    let lang = match language {
        Language::En => "The note is in English.",
        Language::ZhTw => {
            "The note is in Traditional Chinese (Taiwan); copy identifiers exactly as written."
        }
    };
    format!(
        "You de-identify clinical notes. List every piece of protected health information in the \
note below, copying each exactly as it appears, with its type: NAME (people), ORGANIZATION \
(hospitals, clinics, employers), ADDRESS (street, city, district), ZIP, DATE (any date but a \
bare year), AGE (only ages over 89), PHONE, FAX, EMAIL, SSN, MRN, HEALTH_PLAN, ACCOUNT, LICENSE, \
VEHICLE, DEVICE, URL, IP, BIOMETRIC, PHOTO, OTHER_ID, NATIONAL_ID (Taiwan ID), NHI_CARD. Answer a \
JSON list of {{\"text\", \"type\"}} objects; an empty list when there is none. {lang}\n\nNote:\n\
{window}"
    )
}

#[derive(Debug, Deserialize)]
struct Item {
    text: String,
    #[serde(rename = "type")]
    ty: String,
}

/// The `(text, type)` items of a model answer. A truncated answer (the token budget ran out)
/// keeps its complete items; anything unreadable is dropped.
pub fn parse_answer(answer: &str) -> Vec<(String, PhiType)> {
    let a = answer.trim();
    let items: Vec<Value> = match serde_json::from_str::<Value>(a) {
        Ok(Value::Array(v)) => v,
        Ok(Value::Object(mut o)) => match o.remove("phi").or_else(|| o.remove("items")) {
            Some(Value::Array(v)) => v,
            _ => Vec::new(),
        },
        _ => {
            // Cut after the last complete object and close the list.
            let mut v = Vec::new();
            if let Some(cut) = a.rfind('}')
                && let Ok(Value::Array(x)) =
                    serde_json::from_str::<Value>(&format!("{}]", &a[..=cut]))
            {
                v = x;
            }
            v
        }
    };
    items
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Item>(v).ok())
        .filter_map(|i| PhiType::parse(&i.ty).map(|t| (i.text, t)))
        .collect()
}

const COMMON: &[&str] = &[
    "patient",
    "the patient",
    "doctor",
    "hospital",
    "clinic",
    "nurse",
    "date",
    "name",
    "phone",
    "address",
    "age",
    "today",
    "yesterday",
    "mrn",
    "none",
    "n/a",
    "unknown",
    "male",
    "female",
    "man",
    "woman",
    "病人",
    "患者",
    "病患",
    "醫師",
    "醫院",
    "診所",
    "今天",
    "昨天",
    "先生",
    "女士",
    "小姐",
    "家屬",
];

/// Whether a model-listed string is plausible as its type (the model may be small and wrong).
pub fn plausible(s: &str, ty: PhiType) -> bool {
    let n = s.chars().count();
    if !(2..=MAX_ITEM_CHARS).contains(&n) || !s.chars().any(char::is_alphanumeric) {
        return false;
    }
    if COMMON.contains(&s.to_lowercase().as_str()) {
        return false;
    }
    let digits = s.chars().filter(char::is_ascii_digit).count();
    let han = s.chars().any(is_han);
    match ty {
        PhiType::Name => {
            if han {
                let first = s.chars().next().unwrap_or(' ');
                (2..=4).contains(&n)
                    && (lexicon::SURNAMES.contains(first)
                        || lexicon::COMPOUND_SURNAMES.iter().any(|c| s.starts_with(c)))
            } else {
                digits == 0
                    && s.split_whitespace().all(|w| {
                        w.starts_with(|c: char| c.is_uppercase())
                            && !lexicon::NOT_NAMES.contains(&w.trim_end_matches(['.', ',']))
                    })
            }
        }
        PhiType::Organization | PhiType::Address => {
            han || s.starts_with(|c: char| c.is_uppercase() || c.is_ascii_digit())
        }
        PhiType::Date => {
            digits >= 1
                && (s.contains(['/', '-', '.', '月', '年']) || s.split_whitespace().count() >= 2)
        }
        PhiType::Age => s
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse::<u32>().ok())
            .any(|v| (90..=130).contains(&v)),
        PhiType::Email => s.contains('@'),
        PhiType::Url => s.contains('.') && !s.contains(' '),
        PhiType::Ip => s.contains('.') || s.contains(':'),
        PhiType::Biometric | PhiType::Photo => digits >= 1 || s.contains('.'),
        PhiType::Zip => digits >= 3,
        _ => digits >= 2,
    }
}

/// Every occurrence in `text` of each plausible item that the window holds, as a model finding.
pub fn findings(text: &str, window: Window, items: &[(String, PhiType)]) -> Vec<Finding> {
    let win = &text[window.start..window.end];
    let mut out = Vec::new();
    for (s, ty) in items {
        let s = s.trim();
        if !plausible(s, *ty) || !win.contains(s) {
            continue;
        }
        let latin = s
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() && !is_han(c));
        for (i, _) in text.match_indices(s) {
            let e = i + s.len();
            if latin {
                let before = text[..i].chars().next_back();
                let after = text[e..].chars().next();
                if before.is_some_and(char::is_alphanumeric)
                    || (after.is_some_and(char::is_alphanumeric)
                        && s.ends_with(char::is_alphanumeric))
                {
                    continue;
                }
            }
            out.push(Finding {
                start: i,
                end: e,
                ty: *ty,
                source: Source::Model,
                confidence: MODEL_CONFIDENCE,
            });
        }
    }
    out
}

/// Rules plus the model pass: `run(prompt, schema)` answers one window's JSON. Errors of `run`
/// stop the pass and come back as they are.
pub fn deidentify_with_model<E>(
    text: &str,
    language: Option<Language>,
    mode: Mode,
    mut run: impl FnMut(&str, &Value) -> Result<String, E>,
) -> Result<Deidentified, E> {
    let language = language.unwrap_or_else(|| Language::detect(text));
    let mut all = rule_findings(text);
    let schema = schema();
    for w in windows(text, WINDOW_CHARS, OVERLAP_CHARS) {
        let answer = run(&prompt(&text[w.start..w.end], language), &schema)?;
        all.extend(findings(text, w, &parse_answer(&answer)));
    }
    let spans = resolve(text, all);
    Ok(Deidentified {
        text: render(text, &spans, mode),
        spans,
        language,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_and_overlap() {
        let text = "第一句。".repeat(400) + &"word ".repeat(500);
        let w = windows(&text, 300, 50);
        assert_eq!(w[0].start, 0);
        assert_eq!(w.last().unwrap().end, text.len());
        for p in w.windows(2) {
            assert!(p[1].start < p[0].end, "overlap");
            assert!(p[1].start > p[0].start, "progress");
            assert!(text[p[0].start..p[0].end].chars().count() <= 300);
        }
        assert_eq!(windows("short", 300, 50), vec![Window { start: 0, end: 5 }]);
        assert_eq!(windows("", 300, 50).len(), 1);
    }

    #[test]
    fn answers_parse_even_when_cut() {
        let full = r#"[{"text": "Jane Roe", "type": "NAME"}, {"text": "Acme Clinic", "type": "ORGANIZATION"}]"#;
        assert_eq!(parse_answer(full).len(), 2);
        let cut = &full[..full.len() - 20];
        assert_eq!(
            parse_answer(cut),
            vec![("Jane Roe".to_owned(), PhiType::Name)]
        );
        assert!(parse_answer("garbage").is_empty());
        assert!(parse_answer(r#"[{"text": "x", "type": "NOPE"}]"#).is_empty());
    }

    #[test]
    fn model_items_map_to_every_occurrence_and_union_with_rules() {
        let text = "Jane Roe, at home. Later Jane Roe left. MRN 123456. Janet Roex stayed.";
        let out = deidentify_with_model(text, None, Mode::Redact, |p, schema| {
            assert!(p.contains("Jane Roe, at home"));
            assert_eq!(schema["type"], "array");
            Ok::<_, ()>(
                r#"[{"text":"Jane Roe","type":"NAME"},{"text":"123456","type":"MRN"},{"text":"patient","type":"NAME"},{"text":"Nowhere Man","type":"NAME"}]"#
                    .to_owned(),
            )
        })
        .unwrap();
        assert_eq!(
            out.text,
            "[NAME], at home. Later [NAME] left. MRN [MRN]. Janet Roex stayed."
        );
        let mrn = out
            .spans
            .iter()
            .find(|s| s.phi_type == PhiType::Mrn)
            .unwrap();
        assert_eq!(mrn.source, Source::Both);
        assert!(
            out.spans
                .iter()
                .filter(|s| s.phi_type == PhiType::Name)
                .all(|s| s.source == Source::Model)
        );
        let e = deidentify_with_model(text, None, Mode::Redact, |_, _| Err::<String, _>("down"));
        assert_eq!(e.unwrap_err(), "down");
    }

    #[test]
    fn plausibility() {
        assert!(plausible("王小明", PhiType::Name));
        assert!(!plausible("病人", PhiType::Name));
        assert!(!plausible("The Patient", PhiType::Name));
        assert!(plausible("95 years old", PhiType::Age));
        assert!(!plausible("45 years old", PhiType::Age));
        assert!(!plausible("hypertension", PhiType::Mrn));
    }
}
