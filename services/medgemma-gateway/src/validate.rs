//! Requests checked and turned into the gateway's own task types at the edge. Every problem is
//! collected as a `google.rpc.BadRequest` field violation; descriptions name limits, never
//! content.

use medgemma_engine::sampling::SamplingParams;
use medgemma_proto::gateway::v1 as pb;
use medgemma_rpc::FieldViolation;

use crate::config::GatewayArgs;
use crate::error::GatewayError;
use crate::prompt::{self, MAX_OPTIONS, MIN_OPTIONS};

/// The limits and defaults requests are checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_text_bytes: usize,
    pub max_image_bytes: usize,
    pub max_new_tokens_limit: u32,
    pub default_max_new_tokens: u32,
    pub default_temperature: f32,
}

impl From<&GatewayArgs> for Limits {
    fn from(a: &GatewayArgs) -> Self {
        Self {
            max_text_bytes: a.max_text_bytes,
            max_image_bytes: a.max_image_bytes,
            max_new_tokens_limit: a.max_new_tokens_limit,
            default_max_new_tokens: a.default_max_new_tokens,
            default_temperature: a.default_temperature,
        }
    }
}

/// Sampling with the task defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub max_new_tokens: u32,
    pub seed: Option<u64>,
}

/// A checked `Ask`.
#[derive(Debug, Clone)]
pub struct AskTask {
    pub question: String,
    /// The system instruction: the request's, or the default medical one; `None` when the
    /// request set an empty one.
    pub system: Option<String>,
    pub sampling: Sampling,
}

/// A checked `SummarizeClinicalNote`.
#[derive(Debug, Clone)]
pub struct SummarizeTask {
    pub note: String,
    pub output_language: String,
    pub sampling: Sampling,
}

/// A checked `AnswerMultipleChoice`.
#[derive(Debug, Clone)]
pub struct McqTask {
    pub question: String,
    pub options: Vec<String>,
    pub sampling: Sampling,
}

/// A checked `DraftRadiologyReport`.
#[derive(Debug, Clone)]
pub struct ReportTask {
    pub image: Vec<u8>,
    pub mime_type: String,
    pub modality: String,
    pub body_part: String,
    pub sampling: Sampling,
}

/// A checked `Deidentify`.
#[derive(Debug, Clone)]
pub struct DeidentifyTask {
    pub text: String,
    /// `None`: detect from the text.
    pub language: Option<medgemma_deid::Language>,
    pub mode: medgemma_deid::Mode,
    pub use_model: bool,
    pub sampling: Sampling,
}

/// Longest modality or body part, in bytes.
const MAX_LABEL_BYTES: usize = 200;

struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn text(&mut self, field: &str, value: &str, limits: &Limits) {
        if value.trim().is_empty() {
            self.add(field, "must not be empty");
        } else if value.len() > limits.max_text_bytes {
            self.add(
                field,
                format!(
                    "is {} bytes, more than the limit of {} bytes",
                    value.len(),
                    limits.max_text_bytes
                ),
            );
        }
    }

    fn finish<T>(self, value: T) -> Result<T, GatewayError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(GatewayError::InvalidArgument(self.0))
        }
    }
}

fn sampling(s: Option<&pb::Sampling>, limits: &Limits, v: &mut Violations) -> Sampling {
    let default = pb::Sampling::default();
    let s = s.unwrap_or(&default);
    // The set fields judged by the engine's rules (the generator's edge uses the same ones).
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_p: s.top_p.unwrap_or(defaults.top_p),
        top_k: s.top_k.map(|k| k as usize),
        ..defaults
    };
    for p in params.violations() {
        v.add(format!("sampling.{}", p.name), p.reason);
    }
    if let Some(n) = s.max_new_tokens
        && (n == 0 || n > limits.max_new_tokens_limit)
    {
        v.add(
            "sampling.max_new_tokens",
            format!("must be in 1..={}", limits.max_new_tokens_limit),
        );
    }
    Sampling {
        temperature: s.temperature.unwrap_or(limits.default_temperature),
        top_p: s.top_p,
        top_k: s.top_k,
        max_new_tokens: s.max_new_tokens.unwrap_or(limits.default_max_new_tokens),
        seed: s.seed,
    }
}

/// Checks an `Ask`.
pub fn ask(r: pb::AskRequest, limits: &Limits) -> Result<AskTask, GatewayError> {
    let mut v = Violations(Vec::new());
    v.text("question", &r.question, limits);
    if let Some(s) = &r.system
        && s.len() > limits.max_text_bytes
    {
        v.add(
            "system",
            format!("is more than the limit of {} bytes", limits.max_text_bytes),
        );
    }
    let sampling = sampling(r.sampling.as_ref(), limits, &mut v);
    let system = match r.system {
        None => Some(prompt::MEDICAL_SYSTEM_PROMPT.to_owned()),
        Some(s) if s.trim().is_empty() => None,
        Some(s) => Some(s),
    };
    v.finish(AskTask {
        question: r.question,
        system,
        sampling,
    })
}

/// Checks a `SummarizeClinicalNote`.
pub fn summarize(
    r: pb::SummarizeClinicalNoteRequest,
    limits: &Limits,
) -> Result<SummarizeTask, GatewayError> {
    let mut v = Violations(Vec::new());
    v.text("note", &r.note, limits);
    let output_language = match r.output_language.as_deref().map(str::trim) {
        None | Some("") => prompt::DEFAULT_OUTPUT_LANGUAGE.to_owned(),
        Some(tag) => {
            if !prompt::is_language_tag(tag) {
                v.add(
                    "output_language",
                    "must be a BCP 47 language tag such as zh-TW or en",
                );
            }
            tag.to_owned()
        }
    };
    let sampling = sampling(r.sampling.as_ref(), limits, &mut v);
    v.finish(SummarizeTask {
        note: r.note,
        output_language,
        sampling,
    })
}

/// Checks an `AnswerMultipleChoice`.
pub fn multiple_choice(
    r: pb::AnswerMultipleChoiceRequest,
    limits: &Limits,
) -> Result<McqTask, GatewayError> {
    let mut v = Violations(Vec::new());
    v.text("question", &r.question, limits);
    let n = r.options.len();
    if !(MIN_OPTIONS..=MAX_OPTIONS).contains(&n) {
        v.add(
            "options",
            format!("must hold {MIN_OPTIONS} to {MAX_OPTIONS} options, got {n}"),
        );
    }
    for (i, o) in r.options.iter().enumerate() {
        v.text(&format!("options[{i}]"), o, limits);
    }
    let sampling = sampling(r.sampling.as_ref(), limits, &mut v);
    v.finish(McqTask {
        question: r.question,
        options: r.options,
        sampling,
    })
}

/// Checks a `DraftRadiologyReport`.
pub fn report(
    r: pb::DraftRadiologyReportRequest,
    limits: &Limits,
) -> Result<ReportTask, GatewayError> {
    let mut v = Violations(Vec::new());
    let image = r.image.unwrap_or_default();
    if image.data.is_empty() {
        v.add(
            "image.data",
            "must hold an image (PNG, JPEG, WebP, TIFF or DICOM)",
        );
    } else if image.data.len() > limits.max_image_bytes {
        v.add(
            "image.data",
            format!(
                "is {} bytes, more than the limit of {} bytes",
                image.data.len(),
                limits.max_image_bytes
            ),
        );
    } else if medgemma_proto::image_format(&image.data).is_none() {
        v.add(
            "image.data",
            "is not an image the service reads (PNG, JPEG, WebP, TIFF or DICOM)",
        );
    }
    let essence = medgemma_proto::image_media_type(&image.mime_type).unwrap_or_else(|problem| {
        v.add("image.mime_type", problem);
        String::new()
    });
    for (field, value) in [("modality", &r.modality), ("body_part", &r.body_part)] {
        if value.len() > MAX_LABEL_BYTES {
            v.add(field, format!("is more than {MAX_LABEL_BYTES} bytes"));
        }
    }
    let sampling = sampling(r.sampling.as_ref(), limits, &mut v);
    v.finish(ReportTask {
        image: image.data,
        mime_type: essence,
        modality: r.modality,
        body_part: r.body_part,
        sampling,
    })
}

/// Checks a `Deidentify`. Unset temperature means greedy here (listing identifiers is
/// extraction, not writing).
pub fn deidentify(
    r: pb::DeidentifyRequest,
    limits: &Limits,
) -> Result<DeidentifyTask, GatewayError> {
    let mut v = Violations(Vec::new());
    v.text("text", &r.text, limits);
    let language = match r.language.trim() {
        "" | "auto" => None,
        tag => {
            let l = medgemma_deid::Language::parse(tag);
            if l.is_none() {
                v.add("language", "must be en, zh-TW or auto");
            }
            l
        }
    };
    let seed = r.surrogate_seed.unwrap_or_else(|| {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
    });
    let mode = match pb::DeidentifyMode::try_from(r.mode) {
        Ok(pb::DeidentifyMode::Unspecified | pb::DeidentifyMode::Redact) => {
            medgemma_deid::Mode::Redact
        }
        Ok(pb::DeidentifyMode::Mask) => medgemma_deid::Mode::Mask('*'),
        Ok(pb::DeidentifyMode::Surrogate) => medgemma_deid::Mode::Surrogate { seed },
        Err(_) => {
            v.add(
                "mode",
                "must be DEIDENTIFY_MODE_REDACT, _MASK or _SURROGATE",
            );
            medgemma_deid::Mode::Redact
        }
    };
    let explicit_temperature = r.sampling.as_ref().and_then(|s| s.temperature);
    let mut sampling = sampling(r.sampling.as_ref(), limits, &mut v);
    if explicit_temperature.is_none() {
        sampling.temperature = 0.0;
    }
    v.finish(DeidentifyTask {
        text: r.text,
        language,
        mode,
        use_model: r.use_model.unwrap_or(true),
        sampling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_text_bytes: 1000,
            max_image_bytes: 200,
            max_new_tokens_limit: 64,
            default_max_new_tokens: 32,
            default_temperature: 0.1,
        }
    }

    fn fields(e: GatewayError) -> Vec<String> {
        match e {
            GatewayError::InvalidArgument(v) => v.into_iter().map(|f| f.field).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ask_defaults_and_violations() {
        let t = ask(
            pb::AskRequest {
                question: "q".into(),
                ..Default::default()
            },
            &limits(),
        )
        .unwrap();
        assert_eq!(t.sampling.temperature, 0.1);
        assert_eq!(t.sampling.max_new_tokens, 32);
        assert_eq!(t.system.as_deref(), Some(prompt::MEDICAL_SYSTEM_PROMPT));
        let t = ask(
            pb::AskRequest {
                question: "q".into(),
                system: Some(String::new()),
                ..Default::default()
            },
            &limits(),
        )
        .unwrap();
        assert_eq!(t.system, None);
        let e = ask(
            pb::AskRequest {
                question: "  ".into(),
                system: None,
                sampling: Some(pb::Sampling {
                    temperature: Some(f32::NAN),
                    top_p: Some(0.0),
                    top_k: Some(0),
                    max_new_tokens: Some(65),
                    seed: None,
                }),
            },
            &limits(),
        )
        .unwrap_err();
        assert_eq!(
            fields(e),
            vec![
                "question",
                "sampling.temperature",
                "sampling.top_p",
                "sampling.top_k",
                "sampling.max_new_tokens"
            ]
        );
        for (t, p, ok) in [
            (-0.1, 1.0, false),
            (0.0, 1.0, true),
            (1.0, 1.5, false),
            (0.5, f32::NAN, false),
        ] {
            let r = ask(
                pb::AskRequest {
                    question: "q".into(),
                    system: None,
                    sampling: Some(pb::Sampling {
                        temperature: Some(t),
                        top_p: Some(p),
                        ..Default::default()
                    }),
                },
                &limits(),
            );
            assert_eq!(r.is_ok(), ok, "{t} {p}");
        }
    }

    #[test]
    fn summarize_language() {
        let t = summarize(
            pb::SummarizeClinicalNoteRequest {
                note: "n".into(),
                ..Default::default()
            },
            &limits(),
        )
        .unwrap();
        assert_eq!(t.output_language, "zh-TW");
        let e = summarize(
            pb::SummarizeClinicalNoteRequest {
                note: String::new(),
                output_language: Some("not a tag".into()),
                sampling: None,
            },
            &limits(),
        )
        .unwrap_err();
        assert_eq!(fields(e), vec!["note", "output_language"]);
    }

    #[test]
    fn option_counts() {
        for (n, ok) in [(0, false), (1, false), (2, true), (10, true), (11, false)] {
            let r = multiple_choice(
                pb::AnswerMultipleChoiceRequest {
                    question: "q".into(),
                    options: (0..n).map(|i| format!("o{i}")).collect(),
                    sampling: None,
                },
                &limits(),
            );
            assert_eq!(r.is_ok(), ok, "{n}");
        }
        let e = multiple_choice(
            pb::AnswerMultipleChoiceRequest {
                question: "q".into(),
                options: vec!["a".into(), " ".into()],
                sampling: None,
            },
            &limits(),
        )
        .unwrap_err();
        assert_eq!(fields(e), vec!["options[1]"]);
    }

    #[test]
    fn deidentify_checks() {
        let ok = deidentify(
            pb::DeidentifyRequest {
                text: "note".into(),
                ..Default::default()
            },
            &limits(),
        )
        .unwrap();
        assert!(ok.use_model && ok.language.is_none());
        assert_eq!(ok.mode, medgemma_deid::Mode::Redact);
        assert_eq!(ok.sampling.temperature, 0.0);
        let e = deidentify(
            pb::DeidentifyRequest {
                text: " ".into(),
                language: "fr".into(),
                mode: 9,
                ..Default::default()
            },
            &limits(),
        )
        .unwrap_err();
        assert_eq!(fields(e), vec!["text", "language", "mode"]);
        let e = deidentify(
            pb::DeidentifyRequest {
                text: "x".repeat(1001),
                language: "zh-TW".into(),
                mode: pb::DeidentifyMode::Surrogate.into(),
                surrogate_seed: Some(3),
                ..Default::default()
            },
            &limits(),
        )
        .unwrap_err();
        assert_eq!(fields(e), vec!["text"]);
    }

    #[test]
    fn images() {
        let req = |data: Vec<u8>, mime: &str| pb::DraftRadiologyReportRequest {
            image: Some(pb::Image {
                data,
                mime_type: mime.into(),
            }),
            modality: "CR".into(),
            body_part: "chest".into(),
            sampling: None,
        };
        let png = b"\x89PNG\r\n\x1a\n0000".to_vec();
        assert!(report(req(png.clone(), "image/png"), &limits()).is_ok());
        assert!(report(req(png.clone(), ""), &limits()).is_ok());
        assert_eq!(
            fields(report(req(png, "text/plain"), &limits()).unwrap_err()),
            vec!["image.mime_type"]
        );
        assert_eq!(
            fields(report(req(b"hello".to_vec(), ""), &limits()).unwrap_err()),
            vec!["image.data"]
        );
        assert_eq!(
            fields(report(req(vec![0xFF; 201], ""), &limits()).unwrap_err()),
            vec!["image.data"]
        );
        let mut empty = req(Vec::new(), "");
        empty.image = None;
        assert_eq!(
            fields(report(empty, &limits()).unwrap_err()),
            vec!["image.data"]
        );
        let mut dicom = vec![0u8; 140];
        dicom[128..132].copy_from_slice(b"DICM");
        assert!(report(req(dicom, "application/dicom"), &limits()).is_ok());
    }
}
