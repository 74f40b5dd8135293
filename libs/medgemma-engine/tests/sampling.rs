//! Sampler behaviour: greedy, seeding, each filter, penalties, masks, statistics, validation.

use medgemma_engine::sampling::{
    MAX_TOP_LOGPROBS, Sampled, Sampler, SamplingError, SamplingParams, TokenMask,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn sampler(params: SamplingParams) -> Sampler {
    Sampler::new(params).expect("valid params")
}

fn tempered(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed,
        ..SamplingParams::default()
    }
}

/// Logits whose softmax (at temperature 1) is exactly `probs`.
fn logits_of(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

fn draw(s: &mut Sampler, logits: &[f32], mask: Option<&TokenMask>) -> Sampled {
    let mut row = logits.to_vec();
    s.sample(&mut row, &[], &[], mask).expect("sample")
}

fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
    let mut counts = vec![0; logits.len()];
    for _ in 0..n {
        counts[draw(s, logits, None).token as usize] += 1;
    }
    counts
}

fn random_logits(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * scale).collect()
}

#[test]
fn greedy_is_exact_argmax_with_lowest_id_on_ties() {
    let mut s = sampler(SamplingParams::default());
    assert_eq!(draw(&mut s, &[0.1, 2.0, -1.0, 1.9], None).token, 1);
    assert_eq!(draw(&mut s, &[0.0, 5.0, 5.0, 5.0], None).token, 1);
    assert_eq!(
        draw(&mut s, &[f32::NEG_INFINITY, -3.0, -3.0], None).token,
        1
    );
    // Filters and seed do not matter for greedy; temperatures below 1e-5 count as greedy.
    let mut s = sampler(SamplingParams {
        temperature: 1e-6,
        top_k: Some(1),
        top_p: 0.1,
        min_p: 0.9,
        seed: 99,
        ..SamplingParams::default()
    });
    assert_eq!(draw(&mut s, &[0.0, 5.0, 5.0, 4.0], None).token, 1);
}

#[test]
fn greedy_reports_processed_logprobs_at_temperature_one() {
    let probs = [0.5f32, 0.25, 0.125, 0.125];
    let mut s = sampler(SamplingParams {
        top_logprobs: 3,
        ..SamplingParams::default()
    });
    let out = draw(&mut s, &logits_of(&probs), None);
    assert_eq!(out.token, 0);
    assert!((out.logprob - 0.5f32.ln()).abs() < 1e-5);
    let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![0, 1, 2], "best first, ties to the lower id");
    for (id, lp) in &out.top {
        assert!((lp - probs[*id as usize].ln()).abs() < 1e-5);
    }
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rows: Vec<Vec<f32>> = (0..200).map(|_| random_logits(&mut rng, 64, 3.0)).collect();
    let run = |seed| {
        let mut s = sampler(SamplingParams {
            temperature: 0.9,
            top_k: Some(40),
            top_p: 0.95,
            seed,
            ..SamplingParams::default()
        });
        rows.iter()
            .map(|r| draw(&mut s, r, None).token)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1234), run(1234));
    assert_ne!(run(1234), run(4321));
}

#[test]
fn seeded_stream_is_pinned_across_platforms() {
    // ChaCha8 + seed_from_u64 + one f64 per step: this sequence must never change.
    let logits = vec![0.0f32; 10];
    let mut s = sampler(tempered(1.0, 42));
    let got: Vec<u32> = (0..16).map(|_| draw(&mut s, &logits, None).token).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let expected: Vec<u32> = (0..16)
        .map(|_| (rng.random::<f64>() * 10.0) as u32)
        .collect();
    assert_eq!(got, expected);
    assert_eq!(got, GOLDEN_SEED_42);
}

const GOLDEN_SEED_42: [u32; 16] = [6, 9, 4, 6, 2, 1, 3, 8, 7, 2, 5, 9, 9, 5, 7, 1];

#[test]
fn top_k_keeps_only_the_k_best() {
    let probs = [0.1f32, 0.4, 0.2, 0.3];
    let mut s = sampler(SamplingParams {
        temperature: 1.0,
        top_k: Some(2),
        seed: 3,
        ..SamplingParams::default()
    });
    let counts = histogram(&mut s, &logits_of(&probs), 2000);
    assert_eq!(counts[0] + counts[2], 0, "{counts:?}");
    // Renormalised: 0.4/0.7 vs 0.3/0.7.
    let p1 = counts[1] as f64 / 2000.0;
    assert!((p1 - 4.0 / 7.0).abs() < 0.05, "{counts:?}");
}

#[test]
fn top_p_keeps_the_smallest_nucleus() {
    let probs = [0.05f32, 0.5, 0.15, 0.3];
    for (top_p, allowed) in [
        (0.4f32, vec![1usize]),
        (0.45, vec![1]),
        (0.55, vec![1, 3]),
        (0.75, vec![1, 3]),
        (0.85, vec![1, 3, 2]),
        (0.94, vec![1, 3, 2]),
        (0.96, vec![1, 3, 2, 0]),
        (1.0, vec![1, 3, 2, 0]),
    ] {
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            top_p,
            seed: 11,
            ..SamplingParams::default()
        });
        let counts = histogram(&mut s, &logits_of(&probs), 2000);
        for (id, &c) in counts.iter().enumerate() {
            assert_eq!(
                c > 0,
                allowed.contains(&id),
                "top_p {top_p}: token {id} count {c} ({counts:?})"
            );
        }
    }
}

#[test]
fn top_p_renormalises_after_top_k() {
    // top-k=2 keeps {1: 0.5, 3: 0.3}; 0.6 of that mass (0.48) is reached by token 1 alone.
    let probs = [0.05f32, 0.5, 0.15, 0.3];
    let mut s = sampler(SamplingParams {
        temperature: 1.0,
        top_k: Some(2),
        top_p: 0.6,
        seed: 5,
        ..SamplingParams::default()
    });
    let counts = histogram(&mut s, &logits_of(&probs), 500);
    assert_eq!(counts[1], 500, "{counts:?}");
}

#[test]
fn min_p_drops_tokens_below_fraction_of_the_best() {
    // Threshold 0.35 * 0.5 = 0.175: keeps 0.5 and 0.3.
    let probs = [0.05f32, 0.5, 0.15, 0.3];
    let mut s = sampler(SamplingParams {
        temperature: 1.0,
        min_p: 0.35,
        seed: 8,
        ..SamplingParams::default()
    });
    let counts = histogram(&mut s, &logits_of(&probs), 2000);
    assert_eq!(counts[0] + counts[2], 0, "{counts:?}");
    assert!(counts[1] > 0 && counts[3] > 0, "{counts:?}");
}

#[test]
fn top_p_on_a_large_flat_vocab_widens_the_window_and_breaks_ties_by_id() {
    // All tokens tie: the nucleus of mass 0.5 is exactly the lower half of the ids.
    let n = 262_144;
    let logits = vec![0.0f32; n];
    let mut s = sampler(SamplingParams {
        temperature: 1.0,
        top_p: 0.5,
        seed: 1,
        ..SamplingParams::default()
    });
    for _ in 0..50 {
        let t = draw(&mut s, &logits, None).token as usize;
        assert!(t <= n / 2, "token {t} outside the nucleus");
    }
}

#[test]
fn top_p_on_a_large_random_vocab_matches_brute_force() {
    let n = 262_144;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let logits = random_logits(&mut rng, n, 12.0);
    let top_p = 0.3f32;
    // Brute force: full sort, smallest prefix with mass >= top_p.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = logits.iter().map(|&l| f64::from((l - max).exp())).collect();
    let total: f64 = w.iter().sum();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let mut acc = 0.0;
    let mut nucleus = std::collections::HashSet::new();
    for &i in &order {
        if acc >= f64::from(top_p) * total {
            break;
        }
        acc += w[i];
        nucleus.insert(i);
    }
    let mut s = sampler(SamplingParams {
        temperature: 1.0,
        top_p,
        seed: 9,
        ..SamplingParams::default()
    });
    for _ in 0..100 {
        let t = draw(&mut s, &logits, None).token as usize;
        assert!(nucleus.contains(&t), "token {t} outside the nucleus");
    }
}

#[test]
fn top_k_on_a_large_vocab_picks_from_the_k_best() {
    let n = 262_144;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let logits = random_logits(&mut rng, n, 1.0);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let best: std::collections::HashSet<usize> = order[..5].iter().copied().collect();
    let mut s = sampler(SamplingParams {
        temperature: 1.0,
        top_k: Some(5),
        seed: 10,
        ..SamplingParams::default()
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let t = draw(&mut s, &logits, None).token as usize;
        assert!(best.contains(&t), "token {t} not in the top 5");
        seen.insert(t);
    }
    assert!(
        seen.len() >= 4,
        "near-uniform top 5 should all show up: {seen:?}"
    );
}

#[test]
fn repetition_penalty_follows_hf_semantics() {
    let mut s = sampler(SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::default()
    });
    let mut row = vec![2.0f32, -2.0, 1.5, 0.5];
    // Token 1 appears twice but is penalised once; id 99 is out of range and ignored.
    let out = s.sample(&mut row, &[0, 1, 1, 99], &[], None).unwrap();
    assert_eq!(row, vec![1.0, -4.0, 1.5, 0.5]);
    assert_eq!(out.token, 2, "the unpenalised 1.5 now wins");
}

#[test]
fn frequency_and_presence_penalties_follow_openai_semantics() {
    let mut s = sampler(SamplingParams {
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..SamplingParams::default()
    });
    let mut row = vec![1.0f32, 1.0, 1.0, 1.0];
    // Penalties count only generated tokens, not the prompt.
    s.sample(&mut row, &[0, 0, 2, 2, 3], &[2, 2, 3], None)
        .unwrap();
    assert_eq!(row, vec![1.0, 1.0, 1.0 - 1.25, 1.0 - 0.75]);
    // Negative values encourage repetition.
    let mut s = sampler(SamplingParams {
        presence_penalty: -1.0,
        ..SamplingParams::default()
    });
    let mut row = vec![1.0f32, 0.5];
    assert_eq!(s.sample(&mut row, &[], &[1], None).unwrap().token, 1);
}

#[test]
fn temperature_scales_logits_and_logprobs() {
    let probs = [0.6f32, 0.3, 0.1];
    let logits = logits_of(&probs);
    let mut s = sampler(SamplingParams {
        temperature: 2.0,
        top_logprobs: 3,
        seed: 1,
        ..SamplingParams::default()
    });
    let mut row = logits.clone();
    let out = s.sample(&mut row, &[], &[], None).unwrap();
    for (r, l) in row.iter().zip(&logits) {
        assert!((r - l / 2.0).abs() < 1e-6);
    }
    // Processed logprob = log-softmax of logits / T.
    let z: f32 = logits.iter().map(|l| (l / 2.0).exp()).sum();
    let expect = logits[out.token as usize] / 2.0 - z.ln();
    assert!((out.logprob - expect).abs() < 1e-5);
    assert_eq!(out.top.len(), 3);
    assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
}

#[test]
fn logprobs_are_reported_before_truncation() {
    let probs = [0.5f32, 0.3, 0.2];
    let mut s = sampler(SamplingParams {
        temperature: 1.0,
        top_k: Some(1),
        top_logprobs: 2,
        seed: 1,
        ..SamplingParams::default()
    });
    let out = draw(&mut s, &logits_of(&probs), None);
    assert_eq!(out.token, 0);
    assert!(
        (out.logprob - 0.5f32.ln()).abs() < 1e-5,
        "untruncated probability"
    );
    assert_eq!(out.top.len(), 2);
    assert!((out.top[1].1 - 0.3f32.ln()).abs() < 1e-5);
}

/// Counts over many draws stay within 5 standard deviations of the expectation.
fn assert_matches_distribution(counts: &[usize], expected: &[f64]) {
    let n: usize = counts.iter().sum();
    for (i, (&c, &p)) in counts.iter().zip(expected).enumerate() {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1.0);
        assert!(
            (c as f64 - mean).abs() <= 5.0 * sd,
            "token {i}: count {c}, expected {mean:.1} ± {sd:.1} ({counts:?})"
        );
    }
}

#[test]
fn temperature_one_matches_softmax_statistically() {
    let probs = [0.6f32, 0.3, 0.1];
    let mut s = sampler(tempered(1.0, 2024));
    let counts = histogram(&mut s, &logits_of(&probs), 3000);
    assert_matches_distribution(&counts, &[0.6, 0.3, 0.1]);
}

#[test]
fn low_temperature_sharpens_statistically() {
    // T = 0.5 squares the probabilities: [0.36, 0.09, 0.01] / 0.46.
    let probs = [0.6f32, 0.3, 0.1];
    let mut s = sampler(tempered(0.5, 77));
    let counts = histogram(&mut s, &logits_of(&probs), 3000);
    assert_matches_distribution(&counts, &[0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46]);
}

#[test]
fn masked_tokens_are_never_chosen() {
    let n = 1000;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let logits = random_logits(&mut rng, n, 4.0);
    let mut mask = TokenMask::none(n);
    for id in (0..n as u32).filter(|id| id % 7 == 3) {
        mask.allow(id);
    }
    let mut s = sampler(tempered(1.5, 6));
    for _ in 0..500 {
        let out = draw(&mut s, &logits, Some(&mask));
        assert_eq!(out.token % 7, 3);
        assert!(out.logprob.is_finite());
    }
    // Greedy skips a masked argmax.
    let mut g = sampler(SamplingParams::default());
    let mut single = TokenMask::none(3);
    single.allow(2);
    assert_eq!(draw(&mut g, &[9.0, 8.0, 1.0], Some(&single)).token, 2);
    // The processed distribution puts all mass on the only allowed token.
    assert!(draw(&mut g, &[9.0, 8.0, 1.0], Some(&single)).logprob.abs() < 1e-6);
}

#[test]
fn invalid_params_are_rejected_at_construction() {
    let bad = [
        SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: -0.5,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: f32::INFINITY,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_k: Some(0),
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: 1.01,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: f32::NAN,
            ..SamplingParams::default()
        },
        SamplingParams {
            min_p: -0.1,
            ..SamplingParams::default()
        },
        SamplingParams {
            min_p: 1.5,
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: f32::NAN,
            ..SamplingParams::default()
        },
        SamplingParams {
            frequency_penalty: 2.5,
            ..SamplingParams::default()
        },
        SamplingParams {
            presence_penalty: f32::NEG_INFINITY,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_logprobs: MAX_TOP_LOGPROBS + 1,
            ..SamplingParams::default()
        },
    ];
    for p in bad {
        assert!(
            matches!(
                Sampler::new(p.clone()),
                Err(SamplingError::InvalidParam { .. })
            ),
            "{p:?} accepted"
        );
    }
    assert!(SamplingParams::default().validate().is_ok());
}

#[test]
fn bad_logits_are_errors_not_panics() {
    let mut s = sampler(tempered(1.0, 0));
    assert_eq!(
        s.sample(&mut [], &[], &[], None),
        Err(SamplingError::EmptyLogits)
    );
    assert_eq!(
        s.sample(&mut [0.0, f32::NAN], &[], &[], None),
        Err(SamplingError::NonFiniteLogit { token: 1 })
    );
    assert_eq!(
        s.sample(&mut [f32::INFINITY, 0.0], &[], &[], None),
        Err(SamplingError::NonFiniteLogit { token: 0 })
    );
    assert_eq!(
        s.sample(&mut [f32::NEG_INFINITY; 3], &[], &[], None),
        Err(SamplingError::NoAllowedTokens)
    );
    assert_eq!(
        s.sample(&mut [0.0; 3], &[], &[], Some(&TokenMask::all(4))),
        Err(SamplingError::MaskSizeMismatch { mask: 4, logits: 3 })
    );
    assert_eq!(
        s.sample(&mut [0.0; 3], &[], &[], Some(&TokenMask::none(3))),
        Err(SamplingError::NoAllowedTokens)
    );
    // A tiny temperature on huge logits overflows: reported, not sampled.
    let mut tiny = sampler(tempered(2e-5, 0));
    assert_eq!(
        tiny.sample(&mut [3e38, 0.0], &[], &[], None),
        Err(SamplingError::NonFiniteLogit { token: 0 })
    );
}

#[test]
fn violations_lists_every_bad_field_in_field_order() {
    let p = SamplingParams {
        temperature: -1.0,
        top_p: f32::NAN,
        top_k: Some(0),
        min_p: 2.0,
        repetition_penalty: 0.0,
        frequency_penalty: 3.0,
        presence_penalty: -3.0,
        seed: 7,
        top_logprobs: MAX_TOP_LOGPROBS + 1,
    };
    let names: Vec<&str> = p.violations().iter().map(|v| v.name).collect();
    assert_eq!(
        names,
        [
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
            "top_logprobs"
        ]
    );
    // `validate` (and so `Sampler::new`) refuses the first of them.
    assert_eq!(
        p.validate(),
        Err(SamplingError::InvalidParam {
            name: "temperature",
            reason: p.violations()[0].reason.clone(),
        })
    );
    assert!(SamplingParams::default().violations().is_empty());
}
