//! Arbitrary protobuf bytes as gateway requests, then proto-to-domain validation: a task or a
//! field violation, never a panic.

use medgemma_gateway::validate::{self, Limits};
use medgemma_proto::gateway::v1 as pb;
use prost::Message;

pub fn run(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_text_bytes: 4096,
        max_image_bytes: 1 << 16,
        max_new_tokens_limit: 4096,
        default_max_new_tokens: 512,
        default_temperature: 0.1,
    };
    match kind % 5 {
        0 => {
            if let Ok(r) = pb::AskRequest::decode(bytes) {
                let _ = validate::ask(r, &limits);
            }
        }
        1 => {
            if let Ok(r) = pb::SummarizeClinicalNoteRequest::decode(bytes) {
                let _ = validate::summarize(r, &limits);
            }
        }
        2 => {
            if let Ok(r) = pb::AnswerMultipleChoiceRequest::decode(bytes) {
                let _ = validate::multiple_choice(r, &limits);
            }
        }
        3 => {
            if let Ok(r) = pb::DraftRadiologyReportRequest::decode(bytes) {
                let _ = validate::report(r, &limits);
            }
        }
        _ => {
            if let Ok(r) = pb::DeidentifyRequest::decode(bytes) {
                let _ = validate::deidentify(r, &limits);
            }
        }
    }
}
