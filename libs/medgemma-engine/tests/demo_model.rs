//! The real demo model (gemma-3-270m Q4_K_M GGUF, fetched by `medgemma fetch-demo`):
//! transformers parity in dequantized mode, quantized perplexity, and constrained decoding
//! that always parses.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::{D, Tensor};
use medgemma_engine::constraint::ConstraintSpec;
use medgemma_engine::generate::{Engine, FinishReason, GenerationRequest};
use medgemma_engine::sampling::SamplingParams;
use medgemma_model::{Gemma3, KvCacheConfig, LoadOptions, LogitsRows, SeqInput};
use medgemma_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    medgemma_test_support::repo_root().join(p)
}

fn demo() -> Option<medgemma_assets::DemoPaths> {
    medgemma_test_support::demo_assets()
}

fn tokenizer(d: &medgemma_assets::DemoPaths) -> Arc<Tokenizer> {
    static T: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| Arc::new(Tokenizer::from_path(&d.tokenizer_dir).unwrap()))
        .clone()
}

fn quantized(d: &medgemma_assets::DemoPaths) -> Arc<Gemma3> {
    static M: OnceLock<Arc<Gemma3>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Gemma3::load(&d.gguf, &LoadOptions::default()).unwrap()))
        .clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn dequantized_gguf_gives_the_same_greedy_tokens_as_transformers() {
    let Some(d) = demo() else { return };
    let reference: Value =
        serde_json::from_slice(&std::fs::read(repo("fixtures/demo-gguf-reference.json")).unwrap())
            .unwrap();
    let model = Gemma3::load(
        &d.gguf,
        &LoadOptions {
            dequantize: true,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = tokenizer(&d);
    let mut e = Engine::new(Arc::new(model), tok.clone(), KvCacheConfig::default());
    for p in reference["prompts"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        assert_eq!(
            tok.encode(p["text"].as_str().unwrap(), true).unwrap(),
            prompt,
            "tokenization"
        );
        let want = ids(&p["greedy_ids"]);
        let mut req = GenerationRequest::new(prompt, want.len());
        req.ignore_eos = true;
        let out = e.generate(&req, &mut |_| true).unwrap();
        assert_eq!(out.token_ids, want, "greedy tokens for {:?}", p["text"]);
    }
}

/// Perplexity of the model over `ids` (teacher forcing, one forward).
fn perplexity(m: &Gemma3, ids: &[u32]) -> f64 {
    let mut kv = m.new_kv_cache(KvCacheConfig::default());
    let mut s = kv.new_sequence();
    let logits = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s,
                tokens: &ids[..ids.len() - 1],
                image_embeds: None,
                logits: LogitsRows::All,
            }],
        )
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let targets = Tensor::new(&ids[1..], m.device())
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let nll = lsm
        .gather(&targets, 1)
        .unwrap()
        .neg()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    f64::from(nll).exp()
}

#[test]
fn quantized_perplexity_is_within_one_percent_of_dequantized() {
    let Some(d) = demo() else { return };
    let text = std::fs::read_to_string(repo("fixtures/medical_text.txt")).unwrap();
    let ids = tokenizer(&d).encode(&text, true).unwrap();
    assert!(ids.len() > 250, "{} tokens", ids.len());
    let q = perplexity(&quantized(&d), &ids);
    let deq = Gemma3::load(
        &d.gguf,
        &LoadOptions {
            dequantize: true,
            ..Default::default()
        },
    )
    .unwrap();
    let f = perplexity(&deq, &ids);
    let rel = (q - f).abs() / f;
    eprintln!("perplexity: quantized {q:.3}, dequantized {f:.3}, relative difference {rel:.4}");
    assert!(f > 1.0 && f < 100.0, "implausible perplexity {f}");
    assert!(rel < 0.01, "quantized {q} vs dequantized {f}");
}

fn summary_schema() -> Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "chief_complaint": {"type": "string", "maxLength": 60},
            "diagnosis": {"type": "string", "maxLength": 60},
            "treatment_plan": {"type": "string", "maxLength": 60},
            "follow_up": {"type": "string", "maxLength": 60}
        },
        "required": ["chief_complaint", "diagnosis", "treatment_plan", "follow_up"],
        "additionalProperties": false
    })
}

fn summary_prompt(tok: &Tokenizer) -> Vec<u32> {
    let note = "65-year-old man with chest tightness and dyspnoea for three days. BP 155/95, SpO2 94%. \
                Chest X-ray: mild pulmonary oedema. BNP 450 pg/mL. Diagnosis: acute heart failure (HFrEF). \
                IV diuretics, low-salt diet education. Cardiology clinic follow-up.";
    let template = ChatTemplate::gemma3_default(medgemma_assets::cache_dir()).unwrap();
    let msgs = [ChatMessage::user(format!(
        "Summarise this clinical note as JSON with chief_complaint, diagnosis, treatment_plan and follow_up.\n\n{note}"
    ))];
    tok.encode(&template.render(&msgs, true).unwrap(), true)
        .unwrap()
}

#[test]
fn constrained_clinical_summary_always_parses() {
    let Some(d) = demo() else { return };
    let tok = tokenizer(&d);
    let mut e = Engine::new(quantized(&d), tok.clone(), KvCacheConfig::default());
    let prompt = summary_prompt(&tok);
    // Unconstrained, the small base model does not produce this JSON.
    let free = e
        .generate(&GenerationRequest::new(prompt.clone(), 120), &mut |_| true)
        .unwrap();
    let parsed: Result<Value, _> = serde_json::from_str(free.text.trim());
    assert!(
        parsed.map(|v| v.get("follow_up").is_none()).unwrap_or(true),
        "free output already fits the schema"
    );
    for seed in [0u64, 1, 2] {
        let mut req = GenerationRequest::new(prompt.clone(), 400);
        req.sampling = SamplingParams {
            temperature: if seed == 0 { 0.0 } else { 0.8 },
            seed,
            ..SamplingParams::default()
        };
        req.constraint = Some(ConstraintSpec::JsonSchema(summary_schema()));
        let out = e.generate(&req, &mut |_| true).unwrap();
        assert_eq!(
            out.finish_reason,
            FinishReason::Stop,
            "seed {seed}: ran out of tokens"
        );
        let v: Value =
            serde_json::from_str(&out.text).unwrap_or_else(|err| panic!("seed {seed}: {err}"));
        for k in [
            "chief_complaint",
            "diagnosis",
            "treatment_plan",
            "follow_up",
        ] {
            assert!(v[k].is_string(), "seed {seed}: field {k} missing");
        }
    }
    // A budget too small for the structure ends with `length`, never as a success.
    let mut req = GenerationRequest::new(prompt, 6);
    req.constraint = Some(ConstraintSpec::JsonSchema(summary_schema()));
    let out = e.generate(&req, &mut |_| true).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert!(serde_json::from_str::<Value>(&out.text).is_err());
}
