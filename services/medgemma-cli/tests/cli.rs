//! The `medgemma generate` contract, driven through the real binary on the tiny reference model.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-27b-text")
}

fn medgemma(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medgemma"))
        .args(args)
        .output()
        .unwrap()
}

fn golden_case(name: &str) -> Value {
    let v: Value =
        serde_json::from_slice(&std::fs::read(tiny().join("golden.json")).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

#[test]
fn generate_json_has_the_contract_fields_and_matches_the_reference() {
    let c = golden_case("chat_system_zh");
    let msgs = c["messages"].as_array().unwrap();
    let model = tiny();
    let out = medgemma(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--system",
        msgs[0]["content"].as_str().unwrap(),
        "--prompt",
        msgs[1]["content"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(j["prompt_token_ids"], c["prompt_ids"]);
    assert_eq!(j["token_ids"], c["greedy_ids"]);
    assert_eq!(j["finish_reason"], "length");
    assert!(j["text"].is_string());
    assert!(j["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn raw_prompt_gets_exactly_one_bos_and_zero_budget_only_prefills() {
    let c = golden_case("short_a");
    let model = tiny();
    let out = medgemma(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--raw",
        "--prompt",
        c["text"].as_str().unwrap(),
        "--max-new-tokens",
        "0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["prompt_token_ids"], c["prompt_ids"]);
    assert_eq!(j["token_ids"], serde_json::json!([]));
    assert_eq!(j["finish_reason"], "length");
}

#[test]
fn bad_flag_combinations_are_clear_errors() {
    let model = tiny();
    let m = model.to_str().unwrap();
    for (args, needle) in [
        (vec!["--raw", "--system", "s"], "--raw"),
        (vec!["--dtype", "f16"], "bf16"),
        (vec!["--image", "x.png"], "vision"),
        (vec!["--temperature=-1"], "temperature"),
    ] {
        let mut all = vec!["generate", "--model", m, "--prompt", "hi"];
        all.extend(args.iter().copied());
        let out = medgemma(&all);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let out = medgemma(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}
