//! Evaluation against a labelled corpus (`fixtures/deid/*.jsonl`, made by
//! `tools/deid/make_corpus.py`): span recall, token recall, precision, F1 and leak rate, per
//! gold type and overall. Offsets are code points, as the corpus writes them.
//!
//! - span recall: gold spans whose every non-space character is covered by a prediction;
//! - token recall: gold tokens (runs of letters/digits, each Han character alone) whose every
//!   gold character is covered;
//! - precision: predicted tokens (tokens touched by a prediction) that touch gold PHI;
//! - leak rate: gold non-space characters left uncovered.
//!
//! Recall is type-agnostic (a name removed as an organisation is not leaked); precision per
//! type counts the predictions of that type.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::types::is_han;

/// One labelled note.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Note {
    /// Unique id (`en-dev-0001`).
    pub id: String,
    /// `dev` or `test`.
    pub split: String,
    /// `en` or `zh-TW`.
    pub lang: String,
    /// The note.
    pub text: String,
    /// Its PHI.
    pub spans: Vec<GoldSpan>,
}

/// One labelled identifier (code-point offsets, end exclusive).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoldSpan {
    /// First code point.
    pub start: usize,
    /// One past the last.
    pub end: usize,
    /// Its type ([`crate::PhiType::as_str`]).
    #[serde(rename = "type")]
    pub ty: String,
    /// The characters it names (a check of the offsets).
    pub text: String,
}

/// A prediction to score (code-point offsets, end exclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct Predicted {
    /// First code point.
    pub start: usize,
    /// One past the last.
    pub end: usize,
    /// Its type (any label; per-type precision groups by it).
    pub ty: String,
}

/// Why a corpus cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// The file.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A line.
    #[error("{path} line {line}: {why}")]
    Bad {
        path: String,
        line: usize,
        why: String,
    },
}

/// The notes of a JSONL corpus file, each span checked against its text.
pub fn load(path: &Path) -> Result<Vec<Note>, CorpusError> {
    let p = path.display().to_string();
    let raw = std::fs::read_to_string(path).map_err(|source| CorpusError::Io {
        path: p.clone(),
        source,
    })?;
    let mut notes = Vec::new();
    for (i, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |why: String| CorpusError::Bad {
            path: p.clone(),
            line: i + 1,
            why,
        };
        let n: Note = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let chars: Vec<char> = n.text.chars().collect();
        for s in &n.spans {
            let named: String = chars
                .get(s.start..s.end)
                .ok_or_else(|| bad(format!("span {}..{} outside the note", s.start, s.end)))?
                .iter()
                .collect();
            if named != s.text {
                return Err(bad(format!(
                    "span {}..{} does not name its text",
                    s.start, s.end
                )));
            }
        }
        notes.push(n);
    }
    Ok(notes)
}

/// Counts of one type (or all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counts {
    pub gold_spans: usize,
    pub spans_found: usize,
    pub gold_tokens: usize,
    pub tokens_found: usize,
    pub predicted_tokens: usize,
    pub predicted_true: usize,
    pub gold_chars: usize,
    pub chars_leaked: usize,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.gold_spans += o.gold_spans;
        self.spans_found += o.spans_found;
        self.gold_tokens += o.gold_tokens;
        self.tokens_found += o.tokens_found;
        self.predicted_tokens += o.predicted_tokens;
        self.predicted_true += o.predicted_true;
        self.gold_chars += o.gold_chars;
        self.chars_leaked += o.chars_leaked;
    }

    fn ratio(a: usize, b: usize) -> f64 {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    }

    /// Gold spans fully removed.
    pub fn span_recall(&self) -> f64 {
        Self::ratio(self.spans_found, self.gold_spans)
    }

    /// Gold tokens fully removed.
    pub fn token_recall(&self) -> f64 {
        Self::ratio(self.tokens_found, self.gold_tokens)
    }

    /// Removed tokens that were PHI.
    pub fn precision(&self) -> f64 {
        Self::ratio(self.predicted_true, self.predicted_tokens)
    }

    /// Harmonic mean of token recall and precision.
    pub fn f1(&self) -> f64 {
        let (r, p) = (self.token_recall(), self.precision());
        if r + p > 0.0 {
            2.0 * r * p / (r + p)
        } else {
            0.0
        }
    }

    /// PHI characters left in the output.
    pub fn leak_rate(&self) -> f64 {
        Self::ratio(self.chars_leaked, self.gold_chars)
    }
}

/// Per-type and overall counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// By gold type (recall, leaks) and predicted type (precision).
    pub per_type: BTreeMap<String, Counts>,
    /// Everything.
    pub overall: Counts,
    /// Notes scored.
    pub notes: usize,
}

/// Token ranges (code points) of a text: letter/digit runs, each Han character alone.
fn tokens(chars: &[char]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if is_han(c) {
            out.push((i, i + 1));
            i += 1;
        } else if c.is_alphanumeric() {
            let s = i;
            while i < chars.len() && chars[i].is_alphanumeric() && !is_han(chars[i]) {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

/// Scores one note's predictions into `report`.
pub fn score(report: &mut Report, note: &Note, predicted: &[Predicted]) {
    let chars: Vec<char> = note.text.chars().collect();
    let n = chars.len();
    // Per character: the gold type, the predicted type.
    let mut gold: Vec<Option<&str>> = vec![None; n];
    for s in &note.spans {
        for g in gold.iter_mut().take(s.end.min(n)).skip(s.start) {
            *g = Some(s.ty.as_str());
        }
    }
    let mut pred: Vec<Option<&str>> = vec![None; n];
    for p in predicted {
        for x in pred.iter_mut().take(p.end.min(n)).skip(p.start) {
            *x = Some(p.ty.as_str());
        }
    }
    let mut per: BTreeMap<String, Counts> = BTreeMap::new();
    for s in &note.spans {
        let c = per.entry(s.ty.clone()).or_default();
        c.gold_spans += 1;
        let mut leaked = 0;
        let mut total = 0;
        for i in s.start..s.end.min(n) {
            if !chars[i].is_whitespace() {
                total += 1;
                if pred[i].is_none() {
                    leaked += 1;
                }
            }
        }
        c.gold_chars += total;
        c.chars_leaked += leaked;
        if leaked == 0 {
            c.spans_found += 1;
        }
    }
    for (s, e) in tokens(&chars) {
        let g = (s..e).find_map(|i| gold[i]);
        if let Some(t) = g {
            let c = per.entry(t.to_owned()).or_default();
            c.gold_tokens += 1;
            if (s..e).all(|i| gold[i].is_none() || pred[i].is_some()) {
                c.tokens_found += 1;
            }
        }
        if let Some(t) = (s..e).find_map(|i| pred[i]) {
            let c = per.entry(t.to_owned()).or_default();
            c.predicted_tokens += 1;
            if g.is_some() {
                c.predicted_true += 1;
            }
        }
    }
    for (t, c) in per {
        report.overall.add(&c);
        report.per_type.entry(t).or_default().add(&c);
    }
    report.notes += 1;
}

/// Scores `predict` over `notes`.
pub fn evaluate<'a>(
    notes: impl IntoIterator<Item = &'a Note>,
    mut predict: impl FnMut(&Note) -> Vec<Predicted>,
) -> Report {
    let mut r = Report::default();
    for n in notes {
        let p = predict(n);
        score(&mut r, n, &p);
    }
    r
}

/// The rules-only predictions of a note.
pub fn rules_only(note: &Note) -> Vec<Predicted> {
    crate::detect(&note.text)
        .into_iter()
        .map(|s| Predicted {
            start: s.start,
            end: s.end,
            ty: s.phi_type.as_str().to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(text: &str, spans: &[(usize, usize, &str)]) -> Note {
        let chars: Vec<char> = text.chars().collect();
        Note {
            id: "t".into(),
            split: "dev".into(),
            lang: "en".into(),
            text: text.into(),
            spans: spans
                .iter()
                .map(|&(s, e, t)| GoldSpan {
                    start: s,
                    end: e,
                    ty: t.into(),
                    text: chars[s..e].iter().collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn metrics_count_what_they_say() {
        // "John Smith" (NAME), "王小明" (NAME); predicted: "John" and "王小明" and "seen".
        let n = note(
            "John Smith seen 王小明",
            &[(0, 10, "NAME"), (16, 19, "NAME")],
        );
        let p = vec![
            Predicted {
                start: 0,
                end: 4,
                ty: "NAME".into(),
            },
            Predicted {
                start: 11,
                end: 15,
                ty: "DATE".into(),
            },
            Predicted {
                start: 16,
                end: 19,
                ty: "NAME".into(),
            },
        ];
        let mut r = Report::default();
        score(&mut r, &n, &p);
        let o = r.overall;
        assert_eq!((o.gold_spans, o.spans_found), (2, 1));
        assert_eq!((o.gold_tokens, o.tokens_found), (5, 4));
        assert_eq!((o.predicted_tokens, o.predicted_true), (5, 4));
        assert_eq!((o.gold_chars, o.chars_leaked), (12, 5));
        assert_eq!(r.per_type["DATE"].predicted_tokens, 1);
        assert_eq!(r.per_type["DATE"].precision(), 0.0);
        assert!((o.f1() - 0.8).abs() < 1e-12);
    }
}
