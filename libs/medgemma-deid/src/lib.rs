//! De-identification of clinical notes in English and Traditional Chinese.
//!
//! A hybrid detector: deterministic recognizers ([`rules`]) for the 18 HIPAA Safe Harbor
//! identifier types plus organisations and Taiwan's national ID and NHI card numbers, then an
//! optional model pass ([`model`]: the LLM lists the identifiers it sees under a JSON schema,
//! every occurrence is mapped back to offsets), the union resolved for overlaps, and the
//! identifiers replaced ([`Mode`]: tags, a mask character, or consistent surrogates).
//!
//! Spans carry code-point and UTF-8 byte offsets into the input, end exclusive; they always
//! name whole characters (combining marks stay with their base). No gRPC here; nothing here
//! logs.
//!
//! ```
//! use medgemma_deid::{Mode, PhiType, deidentify};
//! let out = deidentify("Mr. John Smith, MRN 00482913, seen 03/05/2023.", None, Mode::Redact);
//! assert_eq!(out.text, "Mr. [NAME], MRN [MRN], seen [DATE].");
//! assert_eq!(out.spans[0].phi_type, PhiType::Name);
//! ```

pub mod dates;
pub mod eval;
pub mod lexicon;
pub mod model;
pub mod normalize;
pub mod rules;
pub mod surrogate;
mod types;

use std::collections::HashSet;

pub use types::{Language, Mode, PhiType, Source, Span, is_han};

use normalize::{Normalized, char_offsets, is_attached};

/// A finding before resolution: a byte range of the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finding {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// What it is.
    pub ty: PhiType,
    /// Who found it.
    pub source: Source,
    /// How sure the finder is.
    pub confidence: f32,
}

/// A de-identified text.
#[derive(Debug, Clone, PartialEq)]
pub struct Deidentified {
    /// The text with every span replaced.
    pub text: String,
    /// What was found, in input order, never overlapping.
    pub spans: Vec<Span>,
    /// The language used (the request's, or detected).
    pub language: Language,
}

/// The rule findings of `text` (input byte offsets; unresolved), names found once in context
/// propagated to their other mentions.
pub fn rule_findings(text: &str) -> Vec<Finding> {
    let norm = Normalized::new(text);
    let cands = rules::RULES.find(norm.text());
    let mut out: Vec<Finding> = cands
        .into_iter()
        .map(|c| Finding {
            start: norm.to_input(c.start),
            end: norm.to_input(c.end),
            ty: c.ty,
            source: Source::Rule,
            confidence: c.conf,
        })
        .collect();
    propagate_names(text, &mut out);
    out
}

/// Every other mention of a name part found in context (`Smith` after `Mr. John Smith`, `小明`
/// after `王小明`).
fn propagate_names(text: &str, out: &mut Vec<Finding>) {
    let mut parts: HashSet<&str> = HashSet::new();
    for f in out.iter().filter(|f| f.ty == PhiType::Name) {
        let name = &text[f.start..f.end];
        if name.chars().any(is_han) {
            let n = name.chars().count();
            if n >= 2 {
                parts.insert(name);
            }
            if n == 3 {
                // The given name alone (王小明 -> 小明).
                let first = name.chars().next().map_or(0, char::len_utf8);
                parts.insert(&name[first..]);
            }
        } else {
            for w in name.split_whitespace() {
                let w = w.trim_end_matches(['.', ',']);
                if w.chars().count() >= 3
                    && w.starts_with(|c: char| c.is_uppercase())
                    && !lexicon::NOT_NAMES.contains(&w)
                {
                    parts.insert(w);
                }
            }
        }
    }
    let mut extra = Vec::new();
    for p in parts {
        let latin = !p.chars().any(is_han);
        for (i, _) in text.match_indices(p) {
            let e = i + p.len();
            if latin {
                let before = text[..i].chars().next_back();
                let after = text[e..].chars().next();
                if before.is_some_and(char::is_alphanumeric)
                    || after.is_some_and(char::is_alphanumeric)
                {
                    continue;
                }
            }
            extra.push(Finding {
                start: i,
                end: e,
                ty: PhiType::Name,
                source: Source::Rule,
                confidence: 0.65,
            });
        }
    }
    out.extend(extra);
}

/// Widens a byte range to whole characters: a start on a combining mark moves back to its base,
/// an end before combining marks moves past them.
fn widen(text: &str, mut s: usize, mut e: usize) -> (usize, usize) {
    while s > 0 && !text.is_char_boundary(s) {
        s -= 1;
    }
    while e < text.len() && !text.is_char_boundary(e) {
        e += 1;
    }
    while s > 0 {
        match text[s..].chars().next() {
            Some(c) if is_attached(c) => {
                s -= text[..s].chars().next_back().map_or(1, char::len_utf8);
            }
            _ => break,
        }
    }
    while let Some(c) = text[e..].chars().next() {
        if is_attached(c) {
            e += c.len_utf8();
        } else {
            break;
        }
    }
    (s, e)
}

fn merge_source(a: Source, b: Source) -> Source {
    if a == b { a } else { Source::Both }
}

/// Resolves overlapping findings into disjoint spans: the surest (then longest) finding wins;
/// what a losing finding covers beyond the winners is kept as its own span (nothing found is
/// dropped); identical ranges, and rule and model findings that mostly overlap, become
/// `Source::Both`; touching spans of one type merge.
pub fn resolve(text: &str, findings: Vec<Finding>) -> Vec<Span> {
    let mut f: Vec<Finding> = findings
        .into_iter()
        .filter(|f| f.start < f.end && f.end <= text.len())
        .map(|mut f| {
            (f.start, f.end) = widen(text, f.start, f.end);
            f
        })
        .collect();
    f.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.start.cmp(&b.start))
            .then((a.source as u8).cmp(&(b.source as u8)))
    });
    // Accepted spans, sorted by start.
    let mut acc: Vec<Finding> = Vec::new();
    for x in f {
        let lo = acc.partition_point(|a| a.end <= x.start);
        let hi = acc.partition_point(|a| a.start < x.end);
        if lo == hi {
            acc.insert(lo, x);
            continue;
        }
        // Overlaps acc[lo..hi]: credit agreeing passes, keep the uncovered pieces.
        for a in &mut acc[lo..hi] {
            let inter = a.end.min(x.end) - a.start.max(x.start);
            let shorter = (a.end - a.start).min(x.end - x.start);
            if a.source != x.source && inter * 2 >= shorter {
                a.source = merge_source(a.source, x.source);
                a.confidence = a.confidence.max(x.confidence);
            }
        }
        let mut pieces = Vec::new();
        let mut cur = x.start;
        for a in &acc[lo..hi] {
            if a.start > cur {
                pieces.push((cur, a.start));
            }
            cur = cur.max(a.end);
        }
        if cur < x.end {
            pieces.push((cur, x.end));
        }
        for (s, e) in pieces {
            if text[s..e].chars().any(char::is_alphanumeric) {
                let (s, e) = trim_ws(text, s, e);
                let at = acc.partition_point(|a| a.end <= s);
                acc.insert(
                    at,
                    Finding {
                        start: s,
                        end: e,
                        ..x
                    },
                );
            }
        }
    }
    // Merge touching spans of one type (a name split in two, an organisation's two halves).
    let mut merged: Vec<Finding> = Vec::with_capacity(acc.len());
    for x in acc {
        if let Some(last) = merged.last_mut()
            && last.ty == x.ty
            && (last.end == x.start
                || (last.ty == PhiType::Name
                    && x.start == last.end + 1
                    && text.as_bytes()[last.end] == b' '))
        {
            last.end = x.end;
            last.source = merge_source(last.source, x.source);
            last.confidence = last.confidence.min(x.confidence);
            continue;
        }
        merged.push(x);
    }
    let mut offsets: Vec<usize> = merged.iter().flat_map(|f| [f.start, f.end]).collect();
    offsets.sort_unstable();
    offsets.dedup();
    let chars = char_offsets(text, &offsets);
    let char_of = |b: usize| chars[offsets.binary_search(&b).expect("offset listed")];
    merged
        .into_iter()
        .map(|f| Span {
            start: char_of(f.start),
            end: char_of(f.end),
            byte_start: f.start,
            byte_end: f.end,
            phi_type: f.ty,
            source: f.source,
            confidence: f.confidence,
        })
        .collect()
}

fn trim_ws(text: &str, s: usize, e: usize) -> (usize, usize) {
    let body = &text[s..e];
    let ls = body.len() - body.trim_start().len();
    let le = body.trim_end().len();
    (s + ls, s + le.max(ls))
}

/// The rule spans of `text`, resolved.
pub fn detect(text: &str) -> Vec<Span> {
    resolve(text, rule_findings(text))
}

/// `text` with `spans` (disjoint, in order) replaced as `mode` says.
pub fn render(text: &str, spans: &[Span], mode: Mode) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut fakes = match mode {
        Mode::Surrogate { seed } => Some(surrogate::Surrogates::new(seed)),
        _ => None,
    };
    for s in spans {
        out.push_str(&text[last..s.byte_start]);
        let orig = &text[s.byte_start..s.byte_end];
        match mode {
            Mode::Redact => {
                out.push('[');
                out.push_str(s.phi_type.as_str());
                out.push(']');
            }
            Mode::Mask(c) => out.extend(std::iter::repeat_n(c, s.end - s.start)),
            Mode::Surrogate { .. } => {
                let f = fakes.as_mut().expect("surrogates").fake(s.phi_type, orig);
                out.push_str(&f);
            }
        }
        last = s.byte_end;
    }
    out.push_str(&text[last..]);
    out
}

/// Rules-only de-identification of `text` (`language` `None`: detected).
pub fn deidentify(text: &str, language: Option<Language>, mode: Mode) -> Deidentified {
    let spans = detect(text);
    Deidentified {
        text: render(text, &spans, mode),
        spans,
        language: language.unwrap_or_else(|| Language::detect(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(start: usize, end: usize, ty: PhiType, source: Source, c: f32) -> Finding {
        Finding {
            start,
            end,
            ty,
            source,
            confidence: c,
        }
    }

    #[test]
    fn resolution_keeps_everything_found_once() {
        let text = "0123456789abcdefghij";
        let spans = resolve(
            text,
            vec![
                f(2, 8, PhiType::Phone, Source::Rule, 0.9),
                f(5, 12, PhiType::OtherId, Source::Rule, 0.4),
                f(2, 8, PhiType::Phone, Source::Model, 0.6),
                f(15, 18, PhiType::Name, Source::Model, 0.6),
            ],
        );
        let got: Vec<(usize, usize, PhiType, Source)> = spans
            .iter()
            .map(|s| (s.start, s.end, s.phi_type, s.source))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 8, PhiType::Phone, Source::Both),
                (8, 12, PhiType::OtherId, Source::Rule),
                (15, 18, PhiType::Name, Source::Model),
            ]
        );
    }

    #[test]
    fn spans_cover_combining_marks_and_count_code_points() {
        let text = "Dr. Jose\u{301} Smith saw 王小明先生";
        let spans = detect(text);
        let name = spans[0];
        assert_eq!(name.text(text), "Jose\u{301} Smith");
        assert_eq!(name.start, 4);
        assert_eq!(name.end, 15);
        let zh = spans
            .iter()
            .find(|s| s.text(text) == "王小明")
            .expect("王小明");
        assert_eq!(zh.start, text.chars().position(|c| c == '王').unwrap());
    }

    #[test]
    fn modes() {
        let text = "Mr. John Smith called 0912-345-678 on 2023-03-05; Smith is 95 years old.";
        let r = deidentify(text, None, Mode::Redact);
        assert_eq!(
            r.text,
            "Mr. [NAME] called [PHONE] on [DATE]; [NAME] is [AGE]."
        );
        let m = deidentify(text, None, Mode::Mask('*'));
        assert!(m.text.starts_with("Mr. ********** called ************ on"));
        let s1 = deidentify(text, None, Mode::Surrogate { seed: 3 });
        let s2 = deidentify(text, None, Mode::Surrogate { seed: 3 });
        assert_eq!(s1.text, s2.text);
        assert!(!s1.text.contains("Smith") && !s1.text.contains("0912-345-678"));
        let surname = s1.text.split_whitespace().nth(2).unwrap();
        assert!(s1.text.contains(&format!("; {surname} is")), "{}", s1.text);
        assert_eq!(r.language, Language::En);
    }
}
