//! Sampler cost on a Gemma-sized (262,208) vocabulary. Ignored by default; run with
//! `cargo test -p medgemma-engine --test sampling_speed -- --ignored --nocapture`.

use std::time::Instant;

use medgemma_engine::sampling::{Sampler, SamplingParams, TokenMask};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 262_208;

#[test]
#[ignore = "timing only"]
fn sampling_speed_on_gemma_vocab() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // Peaked like a real LM head: a few large logits over a noisy floor.
    let mut base: Vec<f32> = (0..VOCAB)
        .map(|_| rng.random::<f32>() * 8.0 - 4.0)
        .collect();
    for _ in 0..20 {
        base[rng.random_range(0..VOCAB)] += 15.0;
    }
    let history: Vec<u32> = (0..2048)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    let mut mask = TokenMask::all(VOCAB);
    for id in (0..VOCAB as u32).step_by(3) {
        mask.disallow(id);
    }
    let cases: Vec<(&str, SamplingParams, bool)> = vec![
        ("greedy", SamplingParams::default(), false),
        ("temp 1.0", params(|p| p.temperature = 1.0), false),
        (
            "temp 0.7 top_k 50",
            params(|p| {
                p.temperature = 0.7;
                p.top_k = Some(50);
            }),
            false,
        ),
        (
            "temp 0.7 top_p 0.9",
            params(|p| {
                p.temperature = 0.7;
                p.top_p = 0.9;
            }),
            false,
        ),
        (
            "temp 1.0 top_p 0.95 (flat)",
            params(|p| {
                p.temperature = 5.0;
                p.top_p = 0.95;
            }),
            false,
        ),
        (
            "temp 0.7 min_p 0.05",
            params(|p| {
                p.temperature = 0.7;
                p.min_p = 0.05;
            }),
            false,
        ),
        (
            "all penalties + top_logprobs 5 + mask",
            params(|p| {
                p.temperature = 0.7;
                p.top_k = Some(64);
                p.top_p = 0.9;
                p.repetition_penalty = 1.1;
                p.frequency_penalty = 0.3;
                p.presence_penalty = 0.3;
                p.top_logprobs = 5;
            }),
            true,
        ),
    ];
    for (name, p, use_mask) in cases {
        let mut s = Sampler::new(p).unwrap();
        let iters = 50;
        let mut row = base.clone();
        let start = Instant::now();
        for _ in 0..iters {
            row.copy_from_slice(&base);
            let m = use_mask.then_some(&mask);
            s.sample(&mut row, &history, &history[..512], m).unwrap();
        }
        let per = start.elapsed() / iters;
        eprintln!("{name:40} {per:?} per token");
    }
}

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}
