//! The task prompts, after the MedGemma field report our users start from: its system
//! prompt, its summary, multiple-choice and radiology prompts. Instructions are written in
//! English and the output language is asked for explicitly, as the report advises (MedGemma's
//! medical training is mostly English: English input, Chinese output).

/// The system instruction of every task unless the request brings its own (`Ask.system`).
pub const MEDICAL_SYSTEM_PROMPT: &str = "You are a medical AI assistant. Provide accurate, \
evidence-based information. Always recommend consulting a healthcare professional for personal \
medical decisions.";

/// The disclaimer every response carries unless configured otherwise.
pub const DEFAULT_DISCLAIMER: &str = "AI-generated draft for a qualified clinician, not medical \
advice. It can be wrong (hallucinations persist, especially drug doses and rare diseases): a \
physician must review it before any clinical use.";

/// The output language of a summary when the request leaves it unset.
pub const DEFAULT_OUTPUT_LANGUAGE: &str = "zh-TW";

/// Option letters, in option order.
pub const OPTION_LETTERS: [&str; 10] = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];

/// The most options a multiple-choice question may have (one per letter).
pub const MAX_OPTIONS: usize = OPTION_LETTERS.len();

/// The fewest options a multiple-choice question may have.
pub const MIN_OPTIONS: usize = 2;

/// A BCP 47 tag's language, as written in an instruction to the model.
pub fn language_name(tag: &str) -> String {
    let lower = tag.to_ascii_lowercase();
    let mut parts = lower.split('-');
    let primary = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let name = match primary {
        "zh" => {
            let simplified = rest
                .iter()
                .any(|p| matches!(*p, "hans" | "cn" | "sg" | "my"));
            if simplified {
                "Simplified Chinese"
            } else {
                "Traditional Chinese"
            }
        }
        "en" => "English",
        "ja" => "Japanese",
        "ko" => "Korean",
        "es" => "Spanish",
        "fr" => "French",
        "de" => "German",
        "it" => "Italian",
        "pt" => "Portuguese",
        "nl" => "Dutch",
        "ru" => "Russian",
        "ar" => "Arabic",
        "hi" => "Hindi",
        "vi" => "Vietnamese",
        "th" => "Thai",
        "id" => "Indonesian",
        "ms" => "Malay",
        "tr" => "Turkish",
        "pl" => "Polish",
        "sv" => "Swedish",
        _ => return format!("the language with BCP 47 tag `{tag}`"),
    };
    format!("{name} ({tag})")
}

/// Whether `tag` looks like a BCP 47 language tag (`zh-TW`, `en`, `pt-BR`, `zh-Hant-TW`).
pub fn is_language_tag(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let primary = parts.next().unwrap_or_default();
    (2..=8).contains(&primary.len())
        && primary.chars().all(|c| c.is_ascii_alphabetic())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Section headings of a summary's text, in its language.
pub struct SummaryHeadings {
    pub chief_complaint: &'static str,
    pub diagnoses: &'static str,
    pub treatment_plan: &'static str,
    pub follow_up: &'static str,
}

/// The headings for a summary in `tag`'s language (Chinese as in the field report, else English).
pub fn summary_headings(tag: &str) -> SummaryHeadings {
    let lower = tag.to_ascii_lowercase();
    if lower == "zh" || lower.starts_with("zh-") {
        if language_name(tag).starts_with("Simplified") {
            SummaryHeadings {
                chief_complaint: "主诉",
                diagnoses: "诊断",
                treatment_plan: "治疗计划",
                follow_up: "追踪事项",
            }
        } else {
            SummaryHeadings {
                chief_complaint: "主訴",
                diagnoses: "診斷",
                treatment_plan: "治療計劃",
                follow_up: "追蹤事項",
            }
        }
    } else {
        SummaryHeadings {
            chief_complaint: "Chief complaint",
            diagnoses: "Diagnoses",
            treatment_plan: "Treatment plan",
            follow_up: "Follow-up",
        }
    }
}

/// The user turn of `SummarizeClinicalNote`.
pub fn summarize(note: &str, output_language: &str) -> String {
    format!(
        "Below is a clinical note. Write a structured summary of it with:\n\
         1. Chief complaint\n\
         2. Diagnoses\n\
         3. Treatment plan\n\
         4. Follow-up\n\n\
         Clinical note:\n{note}\n\n\
         Write the summary in {lang}. Answer with one JSON object with the keys \
         \"chief_complaint\", \"diagnoses\" (a list), \"treatment_plan\" and \"follow_up\".",
        note = note.trim(),
        lang = language_name(output_language),
    )
}

/// The user turn of `AnswerMultipleChoice`.
pub fn multiple_choice(question: &str, options: &[String]) -> String {
    let options_text: Vec<String> = options
        .iter()
        .zip(OPTION_LETTERS)
        .map(|(o, l)| format!("{l}. {}", o.trim()))
        .collect();
    format!(
        "The following is a medical multiple-choice question. Choose the single best answer and \
         explain why, including the relevant physiological mechanism or clinical significance.\n\n\
         Question: {q}\n\n\
         Options:\n{opts}\n\n\
         Answer with the letter of the best option first, then the explanation.",
        q = question.trim(),
        opts = options_text.join("\n"),
    )
}

/// What the model's turn is made to start with once the answer is chosen: the explanation
/// follows it.
pub fn multiple_choice_answer_prefix(letter: &str, option: &str) -> String {
    format!("{letter}. {}\n\nExplanation:", option.trim())
}

/// The text part of `DraftRadiologyReport`'s user turn (the image comes before it).
pub fn radiology_report(modality: &str, body_part: &str) -> String {
    let modality = modality.trim();
    let body_part = body_part.trim();
    let what = match (modality.is_empty(), body_part.is_empty()) {
        (false, false) => format!("this {modality} image of the {body_part}"),
        (false, true) => format!("this {modality} image"),
        (true, false) => format!("this image of the {body_part}"),
        (true, true) => "this medical image".to_owned(),
    };
    format!(
        "You are assisting a radiologist.\n\
         Analyze {what}.\n\
         Please structure your findings as:\n\
         TECHNIQUE: [imaging technique]\n\
         FINDINGS: [detailed observations]\n\
         IMPRESSION: [summary and clinical significance]\n\
         Answer with one JSON object with the keys \"technique\", \"findings\" and \"impression\".\n\
         Note: This is an AI-assisted draft. Final interpretation requires physician review."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages() {
        assert_eq!(language_name("zh-TW"), "Traditional Chinese (zh-TW)");
        assert_eq!(language_name("zh-Hans"), "Simplified Chinese (zh-Hans)");
        assert_eq!(language_name("en"), "English (en)");
        assert!(language_name("qaa").contains("`qaa`"));
        for ok in ["zh-TW", "en", "pt-BR", "zh-Hant-TW", "yue"] {
            assert!(is_language_tag(ok), "{ok}");
        }
        for bad in [
            "",
            "e",
            "zh_TW",
            "en-",
            "1234",
            "zh-TW!",
            "ignore previous instructions",
        ] {
            assert!(!is_language_tag(bad), "{bad}");
        }
        assert_eq!(summary_headings("zh-TW").chief_complaint, "主訴");
        assert_eq!(summary_headings("en-US").chief_complaint, "Chief complaint");
    }

    #[test]
    fn mcq_letters_options_in_order() {
        let p = multiple_choice("Q?", &["Warfarin".into(), "Aspirin".into()]);
        assert!(p.contains("A. Warfarin\nB. Aspirin"));
        assert_eq!(
            multiple_choice_answer_prefix("B", " Aspirin "),
            "B. Aspirin\n\nExplanation:"
        );
    }

    #[test]
    fn report_prompt_names_what_it_reads() {
        assert!(
            radiology_report("PA chest X-ray", "chest")
                .contains("PA chest X-ray image of the chest")
        );
        assert!(radiology_report("", "").contains("this medical image"));
    }
}
