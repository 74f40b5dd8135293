//! The generation loop on the tiny reference model: prompt building, greedy parity, batching,
//! stop rules and budgets.

use std::path::PathBuf;
use std::sync::Arc;

use medgemma_engine::generate::{Engine, FinishReason, GenerationRequest};
use medgemma_engine::sampling::SamplingParams;
use medgemma_model::{Gemma3, KvCacheConfig, LoadOptions};
use medgemma_tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;

use medgemma_test_support::{fixture, ids};

fn golden() -> Vec<Value> {
    medgemma_test_support::golden("tiny-27b-text").cases
}

fn case(name: &str) -> Value {
    golden().into_iter().find(|c| c["name"] == name).unwrap()
}

fn engine() -> Engine {
    let dir = fixture("tiny-27b-text");
    let model = Gemma3::load(&dir, &LoadOptions::default()).unwrap();
    let tok = Tokenizer::from_path(&dir).unwrap();
    Engine::new(Arc::new(model), Arc::new(tok), KvCacheConfig::default())
}

#[test]
fn chat_template_and_encoding_match_transformers_ids() {
    let c = case("chat_system_zh");
    let tok = Tokenizer::from_path(fixture("tiny-27b-text")).unwrap();
    let msgs: Vec<ChatMessage> = c["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m["role"].as_str().unwrap() {
            "system" => ChatMessage::system(m["content"].as_str().unwrap()),
            _ => ChatMessage::user(m["content"].as_str().unwrap()),
        })
        .collect();
    let rendered = tok.chat_template().unwrap().render(&msgs, true).unwrap();
    assert_eq!(rendered, c["prompt_text"].as_str().unwrap());
    let got = tok.encode(&rendered, true).unwrap();
    assert_eq!(got, ids(&c["prompt_ids"]));
    assert_eq!(
        got.iter().filter(|&&t| t == 2).count(),
        1,
        "exactly one BOS"
    );
}

#[test]
fn greedy_generation_matches_the_reference() {
    let mut e = engine();
    for name in ["chat_system_zh", "long_windows"] {
        let c = case(name);
        let want = ids(&c["greedy_ids"]);
        let mut req = GenerationRequest::new(ids(&c["prompt_ids"]), want.len());
        req.ignore_eos = true;
        let out = e.generate(&req, &mut |_| true).unwrap();
        assert_eq!(out.token_ids, want, "{name}");
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert_eq!(out.logprobs.len(), want.len());
        assert!(out.logprobs.iter().all(|s| s.logprob <= 0.0));
    }
    assert_eq!(
        e.kv_bytes_in_use(),
        0,
        "finished sequences free their KV blocks"
    );
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let mut e = engine();
    let reqs: Vec<GenerationRequest> = ["short_a", "short_b", "long_windows"]
        .iter()
        .map(|n| {
            let c = case(n);
            let mut r = GenerationRequest::new(ids(&c["prompt_ids"]), 12);
            r.ignore_eos = true;
            r
        })
        .collect();
    // Different budgets so sequences retire at different steps.
    let mut reqs = reqs;
    reqs[0].max_new_tokens = 3;
    let out = e.generate_batch(&reqs, &mut |_| true).unwrap();
    for (r, o) in reqs.iter().zip(&out) {
        let o = o.as_ref().unwrap();
        let single = e.generate(r, &mut |_| true).unwrap();
        assert_eq!(o.token_ids, single.token_ids);
        assert_eq!(o.token_ids.len(), r.max_new_tokens);
    }
    assert_eq!(
        ids(&case("short_b")["greedy_ids"]),
        out[1].as_ref().unwrap().token_ids
    );
}

#[test]
fn stops_on_eos_stop_strings_budget_and_cancel() {
    let mut e = engine();
    assert!(
        e.eos_ids().contains(&1) && e.eos_ids().contains(&106),
        "{:?}",
        e.eos_ids()
    );
    let c = case("short_a");
    let prompt = ids(&c["prompt_ids"]);
    let first = ids(&c["greedy_ids"])[0];
    // Zero budget only prefills.
    let out = e
        .generate(&GenerationRequest::new(prompt.clone(), 0), &mut |_| true)
        .unwrap();
    assert!(out.token_ids.is_empty());
    assert_eq!(out.finish_reason, FinishReason::Length);
    // A stop string that the first token's text contains ends generation with `stop`.
    let text = e.tokenizer().decode(&[first], true).unwrap();
    let mut req = GenerationRequest::new(prompt.clone(), 10);
    req.stop_strings = vec![text.trim().chars().take(1).collect()];
    let out = e.generate(&req, &mut |_| true).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.token_ids.len(), 1);
    // Cancelling from the callback stops at once and frees the cache.
    let mut n = 0;
    let out = e
        .generate(&GenerationRequest::new(prompt.clone(), 10), &mut |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.token_ids.len(), 3);
    assert_eq!(e.kv_bytes_in_use(), 0);
    // Sampling is seeded: the same seed gives the same tokens.
    let mut req = GenerationRequest::new(prompt, 8);
    req.ignore_eos = true;
    req.sampling = SamplingParams {
        temperature: 1.5,
        seed: 42,
        ..SamplingParams::default()
    };
    let a = e.generate(&req, &mut |_| true).unwrap().token_ids;
    let b = e.generate(&req, &mut |_| true).unwrap().token_ids;
    assert_eq!(a, b);
}

#[test]
fn bad_requests_are_errors_in_their_slot() {
    let mut e = engine();
    let ok = GenerationRequest::new(vec![2, 571], 2);
    let empty = GenerationRequest::new(vec![], 2);
    let long = GenerationRequest::new(vec![5; 600], 2);
    let mut bad_sampling = GenerationRequest::new(vec![2, 571], 2);
    bad_sampling.sampling.top_p = 1.5;
    let out = e
        .generate_batch(&[ok, empty, long, bad_sampling], &mut |_| true)
        .unwrap();
    assert!(out[0].is_ok());
    assert!(out[1].as_ref().unwrap_err().to_string().contains("empty"));
    let msg = out[2].as_ref().unwrap_err().to_string();
    assert!(msg.contains("600") && msg.contains("512"), "{msg}");
    assert!(out[3].as_ref().unwrap_err().to_string().contains("top_p"));
}

#[test]
fn first_token_logprobs_are_the_raw_log_softmax_at_the_first_position() {
    let mut e = engine();
    let c = case("short_a");
    let mut req = GenerationRequest::new(ids(&c["prompt_ids"]), 3);
    req.sampling.top_logprobs = 3;
    let greedy = e.generate(&req, &mut |_| true).unwrap();
    let first = greedy.token_ids[0];
    let runner_up = greedy.logprobs[0].top[1].0;
    let other = if first == 5 { 6 } else { 5 };
    req.logprob_token_ids = vec![other, first, runner_up];
    // Sampling settings do not change them: they are the model's own distribution.
    req.sampling.temperature = 5.0;
    req.sampling.top_k = Some(1);
    let out = e.generate(&req, &mut |_| true).unwrap();
    let got = &out.first_token_logprobs;
    assert_eq!(
        got.iter().map(|&(id, _)| id).collect::<Vec<_>>(),
        vec![other, first, runner_up]
    );
    assert!((got[1].1 - greedy.logprobs[0].logprob).abs() < 1e-4);
    assert!((got[2].1 - greedy.logprobs[0].top[1].1).abs() < 1e-4);
    assert!(got.iter().all(|&(_, lp)| lp <= 0.0));
    assert!(got[1].1 >= got[0].1 && got[1].1 >= got[2].1);

    req.logprob_token_ids = vec![u32::MAX];
    let out = e
        .generate_batch(std::slice::from_ref(&req), &mut |_| true)
        .unwrap();
    assert!(out[0].is_err(), "an id outside the vocabulary is refused");
}

/// The tiny model's tokenizer without its ids from `keep` on (vocabulary, added tokens and the
/// merges that use them), written to a fresh directory: a tokenizer smaller than the model's
/// output head, as MedGemma's (262,145 ids for 262,208 rows).
fn truncated_tokenizer(keep: u64) -> PathBuf {
    let src = fixture("tiny-27b-text");
    let mut t: Value =
        serde_json::from_slice(&std::fs::read(src.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    let gone: std::collections::HashSet<String> = vocab
        .iter()
        .filter(|(_, id)| id.as_u64().unwrap() >= keep)
        .map(|(k, _)| k.clone())
        .collect();
    vocab.retain(|_, id| id.as_u64().unwrap() < keep);
    t["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["id"].as_u64().unwrap() < keep);
    t["model"]["merges"].as_array_mut().unwrap().retain(|m| {
        let pieces: Vec<String> = match m {
            Value::String(s) => s.split(' ').map(str::to_owned).collect(),
            Value::Array(a) => a.iter().map(|p| p.as_str().unwrap().to_owned()).collect(),
            _ => unreachable!(),
        };
        let merged: String = pieces.concat();
        !pieces.iter().any(|p| gone.contains(p)) && !gone.contains(&merged)
    });
    let dir = std::env::temp_dir().join(format!("medgemma-tok-{keep}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&t).unwrap()).unwrap();
    for f in [
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn ids_the_tokenizer_lacks_are_generated_and_decode_as_nothing() {
    let keep = 650u32;
    let model = Gemma3::load(&fixture("tiny-27b-text"), &LoadOptions::default()).unwrap();
    let tok = Tokenizer::from_path(truncated_tokenizer(keep.into())).unwrap();
    assert_eq!(tok.vocab_size(), keep as usize);
    assert!(model.config().text.vocab_size > tok.vocab_size());
    let tok = Arc::new(tok);
    let mut e = Engine::new(Arc::new(model), tok.clone(), KvCacheConfig::default());
    let prompt = tok.encode("hello world", true).unwrap();
    let mut req = GenerationRequest::new(prompt, 64);
    req.ignore_eos = true;
    // Near-uniform sampling over the model's 717 rows: some of the 64 tokens are ids >= 650.
    req.sampling.temperature = 100.0;
    req.sampling.seed = 7;
    let out = e.generate(&req, &mut |_| true).unwrap();
    assert_eq!(out.token_ids.len(), 64);
    assert!(
        out.token_ids.iter().any(|&id| id >= keep),
        "{:?}",
        out.token_ids
    );
    let known: Vec<u32> = out
        .token_ids
        .iter()
        .copied()
        .filter(|&id| id < keep)
        .collect();
    assert_eq!(out.text, tok.decode(&known, true).unwrap());
}
