//! Constrained decoding against the real Gemma 3 tokenizer, driven by a random "model".
//!
//! Needs `$MEDGEMMA_CACHE_DIR/demo/tokenizer/tokenizer.json` (default
//! `~/.cache/medgemma`); skipped when missing unless `MEDGEMMA_REQUIRE_ASSETS=1`.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use medgemma_engine::constraint::{
    Constraint, ConstraintError, ConstraintFactory, ConstraintSpec, MAX_SCHEMA_DEPTH, TokenMask,
};
use medgemma_engine::sampling::{Sampler, SamplingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// MedGemma's embedding has 262,208 rows; the tokenizer has 262,145 pieces.
const MODEL_VOCAB: usize = 262_208;
/// `<eos>` and `<end_of_turn>`.
const EOS_IDS: [u32; 2] = [1, 106];

struct Assets {
    tokenizer: Tokenizer,
    factory: ConstraintFactory,
    /// Tokens whose text contains JSON structure characters (used to bias the random model).
    structural: Vec<u32>,
}

fn tokenizer_path() -> PathBuf {
    let cache = std::env::var_os("MEDGEMMA_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/medgemma")
        });
    cache.join("demo/tokenizer/tokenizer.json")
}

fn assets() -> Option<&'static Assets> {
    static ASSETS: OnceLock<Option<Assets>> = OnceLock::new();
    ASSETS
        .get_or_init(|| {
            let path = tokenizer_path();
            if !path.exists() {
                assert!(
                    std::env::var("MEDGEMMA_REQUIRE_ASSETS").as_deref() != Ok("1"),
                    "MEDGEMMA_REQUIRE_ASSETS=1 but {} is missing",
                    path.display()
                );
                eprintln!("skipping: {} not found", path.display());
                return None;
            }
            let tokenizer = Tokenizer::from_file(&path).expect("load tokenizer");
            let start = Instant::now();
            let factory =
                ConstraintFactory::new(&tokenizer, &EOS_IDS, MODEL_VOCAB).expect("factory");
            eprintln!(
                "constraint factory built in {:?} ({:?})",
                start.elapsed(),
                factory.vocab_info()
            );
            let structural = (0..tokenizer.get_vocab_size(false) as u32)
                .filter(|&id| {
                    tokenizer
                        .id_to_token(id)
                        .is_some_and(|p| p.contains(['"', '}', ']', ',']))
                })
                .collect();
            Some(Assets {
                tokenizer,
                factory,
                structural,
            })
        })
        .as_ref()
}

fn clinical_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "chief_complaint": {"type": "string"},
            "diagnoses": {"type": "array", "items": {"type": "string"}},
            "treatment_plan": {"type": "string"},
            "follow_up": {"type": "string"}
        },
        "required": ["chief_complaint", "diagnoses", "treatment_plan", "follow_up"],
        "additionalProperties": false
    })
}

struct Run {
    tokens: Vec<u32>,
    finished: bool,
    hit_eos: bool,
}

/// Generates with random logits (uniform noise, plus `bias` on structural tokens and EOS so
/// that strings close in reasonable time) through the real Sampler, until the constraint is
/// finished, an EOS is sampled, or `max_tokens` runs out.
fn run_random_model(
    a: &Assets,
    constraint: &mut Constraint,
    seed: u64,
    bias: f32,
    max_tokens: usize,
) -> Run {
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed,
        ..SamplingParams::default()
    })
    .unwrap();
    let mut noise = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut tokens = Vec::new();
    let mut logits = vec![0.0f32; MODEL_VOCAB];
    let mut constraint_time = std::time::Duration::ZERO;
    while !constraint.is_finished() && tokens.len() < max_tokens {
        for l in logits.iter_mut() {
            *l = noise.random::<f32>() * 4.0;
        }
        for &id in a.structural.iter().chain(&EOS_IDS) {
            logits[id as usize] += bias;
        }
        let t = Instant::now();
        let mask = constraint.allowed_tokens().unwrap();
        constraint_time += t.elapsed();
        assert_eq!(mask.len(), MODEL_VOCAB);
        let s = sampler
            .sample(&mut logits, &tokens, &tokens, Some(&mask))
            .unwrap();
        assert!(mask.is_allowed(s.token));
        let t = Instant::now();
        constraint.commit(s.token).unwrap();
        constraint_time += t.elapsed();
        if EOS_IDS.contains(&s.token) {
            assert!(constraint.is_finished(), "EOS accepted but not finished");
            return Run {
                tokens,
                finished: true,
                hit_eos: true,
            };
        }
        tokens.push(s.token);
    }
    eprintln!(
        "  mask+commit: {:?} per token",
        constraint_time / (tokens.len().max(1) as u32)
    );
    Run {
        finished: constraint.is_finished(),
        tokens,
        hit_eos: false,
    }
}

fn decode(a: &Assets, tokens: &[u32]) -> String {
    a.tokenizer.decode(tokens, false).unwrap()
}

fn check_clinical_shape(v: &Value) {
    let obj = v.as_object().expect("object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "chief_complaint",
            "diagnoses",
            "follow_up",
            "treatment_plan"
        ]
    );
    assert!(obj["chief_complaint"].is_string());
    assert!(obj["treatment_plan"].is_string());
    assert!(obj["follow_up"].is_string());
    let diagnoses = obj["diagnoses"].as_array().expect("diagnoses array");
    assert!(diagnoses.iter().all(Value::is_string));
}

#[test]
fn factory_is_shareable_and_masks_cover_model_vocab() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<ConstraintFactory>();
    send::<Constraint>();
    let Some(a) = assets() else { return };
    let info = a.factory.vocab_info();
    assert_eq!(info.model_vocab_size, MODEL_VOCAB);
    assert_eq!(info.tokenizer_vocab_size, 262_145);
    assert_eq!(info.unusable_tokens, 0);
    let mut c = a
        .factory
        .create(&ConstraintSpec::JsonSchema(clinical_schema()))
        .unwrap();
    let mask = c.allowed_tokens().unwrap();
    assert_eq!(mask.len(), MODEL_VOCAB);
    assert!(mask.count_allowed() >= 1);
    // Padding rows, EOS, and special tokens are not allowed at the start of a JSON document.
    for id in 262_145..MODEL_VOCAB as u32 {
        assert!(!mask.is_allowed(id));
    }
    for id in EOS_IDS.iter().chain(&[0, 2, 105, 262_144]) {
        assert!(!mask.is_allowed(*id), "token {id} allowed at start");
    }
    // Every allowed first token starts with `{`.
    for id in mask.iter_allowed() {
        assert!(decode(a, &[id]).starts_with('{'), "token {id}");
    }
    // Factory clones share the same trie.
    let f2 = a.factory.clone();
    std::thread::spawn(move || {
        let mut c = f2.create(&ConstraintSpec::Regex("[A-D]".into())).unwrap();
        assert!(c.allowed_tokens().unwrap().count_allowed() >= 4);
    })
    .join()
    .unwrap();
}

/// Runs the clinical schema; checks that a finished run is valid JSON of the right shape
/// and an unfinished one is not a complete document. Returns whether it finished.
fn clinical_run(a: &Assets, seed: u64, bias: f32, max_tokens: usize) -> bool {
    let mut c = a
        .factory
        .create(&ConstraintSpec::JsonSchema(clinical_schema()))
        .unwrap();
    let start = Instant::now();
    let run = run_random_model(a, &mut c, seed, bias, max_tokens);
    eprintln!(
        "seed {seed} bias {bias}: {} tokens, finished={} (eos={}) in {:?}",
        run.tokens.len(),
        run.finished,
        run.hit_eos,
        start.elapsed()
    );
    let text = decode(a, &run.tokens);
    if run.finished {
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("seed {seed}: invalid JSON ({e}): {text:?}"));
        check_clinical_shape(&v);
    } else {
        // Out of budget: not complete, EOS not allowed, so the caller reports `length`.
        assert!(!c.is_accepting().unwrap());
        assert!(serde_json::from_str::<Value>(&text).is_err());
    }
    run.finished
}

#[test]
fn json_schema_random_model_always_yields_valid_json() {
    let Some(a) = assets() else { return };
    // Biased towards `"`, `,`, `]`, `}` and EOS so that strings close quickly.
    let finished = (0..6u64)
        .filter(|&seed| clinical_run(a, seed, 12.0, 3000))
        .count();
    assert!(finished >= 5, "only {finished}/6 biased runs completed");
    // Pure noise: strings run long; whatever happens, nothing invalid is reported as done.
    for seed in 100..103u64 {
        clinical_run(a, seed, 0.0, 400);
    }
}

#[test]
fn json_schema_enums_and_integers() {
    let Some(a) = assets() else { return };
    let schema = json!({
        "type": "object",
        "properties": {
            "severity": {"enum": ["mild", "moderate", "severe"]},
            "age": {"type": "integer"},
            "icd10": {"type": "array", "items": {"type": "string"}, "maxItems": 3}
        },
        "required": ["severity", "age", "icd10"],
        "additionalProperties": false
    });
    let spec = ConstraintSpec::JsonSchema(schema);
    for seed in 0..4u64 {
        let mut c = a.factory.create(&spec).unwrap();
        let run = run_random_model(a, &mut c, 100 + seed, 12.0, 3000);
        assert!(run.finished, "seed {seed} did not finish");
        let text = decode(a, &run.tokens);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("seed {seed}: invalid JSON ({e}): {text:?}"));
        assert!(["mild", "moderate", "severe"].contains(&v["severity"].as_str().unwrap()));
        assert!(v["age"].is_i64() || v["age"].is_u64(), "{text}");
        let icd = v["icd10"].as_array().unwrap();
        assert!(icd.len() <= 3 && icd.iter().all(Value::is_string));
    }
}

#[test]
fn regex_choice_finishes_after_one_letter() {
    let Some(a) = assets() else { return };
    let spec = ConstraintSpec::Regex("[A-D]".into());
    let mut seen = std::collections::HashSet::new();
    for seed in 0..12u64 {
        let mut c = a.factory.create(&spec).unwrap();
        let mask = c.allowed_tokens().unwrap();
        assert!(EOS_IDS.iter().all(|&e| !mask.is_allowed(e)));
        let run = run_random_model(a, &mut c, seed, 0.0, 10);
        assert!(run.finished);
        let text = decode(a, &run.tokens);
        assert!(["A", "B", "C", "D"].contains(&text.as_str()), "{text:?}");
        seen.insert(text);
        // Once complete only EOS may follow, and committing it is harmless.
        let after = c.allowed_tokens().unwrap();
        assert!(after.iter_allowed().all(|t| EOS_IDS.contains(&t)));
        c.commit(EOS_IDS[1]).unwrap();
        assert!(c.is_finished());
    }
    assert!(seen.len() >= 3, "{seen:?}");
}

#[test]
fn regex_with_repetition_allows_eos_only_when_complete() {
    let Some(a) = assets() else { return };
    let spec = ConstraintSpec::Regex(r"[0-9]{3}-[0-9]{2}".into());
    for seed in 0..4u64 {
        let mut c = a.factory.create(&spec).unwrap();
        let run = run_random_model(a, &mut c, seed, 0.0, 50);
        assert!(run.finished);
        let text = decode(a, &run.tokens);
        let b = text.as_bytes();
        assert_eq!(b.len(), 6, "{text:?}");
        assert!(b[..3].iter().chain(&b[4..]).all(u8::is_ascii_digit) && b[3] == b'-');
    }
}

#[test]
fn eos_ends_a_match_that_could_still_grow() {
    let Some(a) = assets() else { return };
    let spec = ConstraintSpec::Regex("[a-c]+".into());
    // Without computing masks: EOS is rejected until a letter was committed.
    let mut c = a.factory.create(&spec).unwrap();
    let letter = a.tokenizer.token_to_id("a").unwrap();
    assert_eq!(
        c.commit(1),
        Err(ConstraintError::TokenRejected { token: 1 })
    );
    c.commit(letter).unwrap();
    assert!(!c.is_finished() && c.is_accepting().unwrap());
    c.commit(1).unwrap();
    assert!(c.is_finished());
    assert_eq!(
        c.commit(letter),
        Err(ConstraintError::TokenRejected { token: letter })
    );
    for seed in 0..4u64 {
        let mut c = a.factory.create(&spec).unwrap();
        // EOS is not allowed before the first letter.
        let first = c.allowed_tokens().unwrap();
        assert!(EOS_IDS.iter().all(|&e| !first.is_allowed(e)));
        // Heavy EOS bias: the run ends on EOS as soon as it becomes legal.
        let run = run_random_model(a, &mut c, seed, 30.0, 50);
        assert!(run.hit_eos && run.finished && c.is_finished());
        assert_eq!(c.committed_tokens(), run.tokens.len() + 1);
        let text = decode(a, &run.tokens);
        assert!(
            !text.is_empty() && text.bytes().all(|b| (b'a'..=b'c').contains(&b)),
            "{text:?}"
        );
    }
}

#[test]
fn running_out_of_tokens_is_not_finished() {
    let Some(a) = assets() else { return };
    let mut c = a
        .factory
        .create(&ConstraintSpec::JsonSchema(clinical_schema()))
        .unwrap();
    let run = run_random_model(a, &mut c, 7, 12.0, 5);
    assert_eq!(run.tokens.len(), 5);
    assert!(!run.finished && !c.is_finished());
    assert!(!c.is_accepting().unwrap());
    let text = decode(a, &run.tokens);
    assert!(serde_json::from_str::<Value>(&text).is_err());
    // EOS is still not allowed: the caller must report `length`.
    let mask = c.allowed_tokens().unwrap();
    assert!(EOS_IDS.iter().all(|&e| !mask.is_allowed(e)));
}

#[test]
fn rejected_token_leaves_the_constraint_usable() {
    let Some(a) = assets() else { return };
    let mut c = a
        .factory
        .create(&ConstraintSpec::JsonSchema(clinical_schema()))
        .unwrap();
    let x = a.tokenizer.token_to_id("x").unwrap();
    // Rejected both with and without a cached mask.
    assert_eq!(
        c.commit(x),
        Err(ConstraintError::TokenRejected { token: x })
    );
    let mask = c.allowed_tokens().unwrap();
    assert!(!mask.is_allowed(x));
    assert_eq!(
        c.commit(x),
        Err(ConstraintError::TokenRejected { token: x })
    );
    assert_eq!(
        c.commit(MODEL_VOCAB as u32 + 5),
        Err(ConstraintError::TokenRejected {
            token: MODEL_VOCAB as u32 + 5
        })
    );
    assert_eq!(c.committed_tokens(), 0);
    let run = run_random_model(a, &mut c, 3, 12.0, 3000);
    assert!(run.finished);
    check_clinical_shape(&serde_json::from_str(&decode(a, &run.tokens)).unwrap());
}

#[test]
fn invalid_specs_and_configs_are_errors() {
    let Some(a) = assets() else { return };
    for spec in [
        ConstraintSpec::Regex("(unclosed".into()),
        ConstraintSpec::Regex(r"abc\".into()),
        ConstraintSpec::JsonSchema(json!("not a schema")),
        ConstraintSpec::JsonSchema(json!({"type": "no-such-type"})),
    ] {
        assert!(
            matches!(
                a.factory.create(&spec),
                Err(ConstraintError::InvalidSpec(_))
            ),
            "{spec:?} accepted"
        );
    }
    for (eos, vocab) in [
        (&[][..], MODEL_VOCAB),
        (&[MODEL_VOCAB as u32][..], MODEL_VOCAB),
        (&[1][..], 0),
    ] {
        assert!(matches!(
            ConstraintFactory::new(&a.tokenizer, eos, vocab),
            Err(ConstraintError::InvalidConfig(_))
        ));
    }
}

#[test]
fn model_vocab_smaller_than_tokenizer_drops_the_extra_ids() {
    let Some(a) = assets() else { return };
    // The 270m demo model has 262,144 rows: `<image_soft_token>` (262,144) does not exist.
    let f = ConstraintFactory::new(&a.tokenizer, &EOS_IDS, 262_144).unwrap();
    let mut c = f.create(&ConstraintSpec::Regex("[A-D]".into())).unwrap();
    let mask: TokenMask = c.allowed_tokens().unwrap();
    assert_eq!(mask.len(), 262_144);
    assert!(mask.count_allowed() >= 4);
}

#[test]
fn deep_schemas_compile_on_a_small_stack_or_are_rejected() {
    let Some(a) = assets() else { return };
    let nested = |levels: usize| {
        let mut schema = json!({"type": "string"});
        for _ in 0..levels {
            schema = json!({"type": "object", "properties": {"x": schema}, "required": ["x"]});
        }
        ConstraintSpec::JsonSchema(schema)
    };
    // Each level adds 3 JSON nesting levels (object, properties, x).
    let ok = nested((MAX_SCHEMA_DEPTH - 1) / 3);
    let too_deep = nested(100);
    let regex = ConstraintSpec::Regex(format!("{}a{}", "(".repeat(5000), ")".repeat(5000)));
    let f = a.factory.clone();
    let (ok, too_deep, regex) = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            (
                f.create(&ok).map(drop),
                f.create(&too_deep).map(drop),
                f.create(&regex).map(drop),
            )
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(ok, Ok(()));
    assert!(matches!(too_deep, Err(ConstraintError::InvalidSpec(_))));
    assert!(
        matches!(regex, Err(ConstraintError::InvalidSpec(_))),
        "{regex:?}"
    );
}
