//! Continuous batching on the tiny reference models: the step-driven engine gives every request
//! the tokens it gets alone, whatever it is batched with, however its prompt is chunked, and
//! whether or not it was preempted; cancellation and limits free what they must.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use medgemma_engine::EngineError;
use medgemma_engine::generate::{
    Engine, FinishReason, GenerationRequest, SchedulerConfig, StepEvent,
};
use medgemma_engine::sampling::SamplingParams;
use medgemma_model::{Gemma3, KvCacheConfig, LoadOptions};
use medgemma_tokenizer::Tokenizer;
use serde_json::Value;

use medgemma_test_support::{fixture, ids};

fn golden(model: &str) -> Value {
    medgemma_test_support::read_json(fixture(format!("{model}/golden.json")))
}

fn case(model: &str, name: &str) -> Value {
    golden(model)["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn load(model: &str) -> (Arc<Gemma3>, Arc<Tokenizer>) {
    let dir = fixture(model);
    let m = Gemma3::load(&dir, &LoadOptions::default()).unwrap();
    let t = Tokenizer::from_path(&dir).unwrap();
    (Arc::new(m), Arc::new(t))
}

fn engine(model: &str, kv: KvCacheConfig, sched: SchedulerConfig) -> Engine {
    let (m, t) = load(model);
    Engine::with_scheduler(m, t, kv, sched)
}

fn sched(max_batch_tokens: usize, max_running: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens,
        max_running,
        max_input_tokens: None,
        prefix_caching: true,
    }
}

/// 16 requests of different prompt lengths and budgets: the golden cases, prefixes and
/// suffixes of the long ones; half sampled with their own seeds.
fn sixteen() -> Vec<GenerationRequest> {
    let mut prompts: Vec<Vec<u32>> = ["short_a", "short_b", "long_windows", "chat_system_zh"]
        .iter()
        .map(|n| ids(&case("tiny-27b-text", n)["prompt_ids"]))
        .collect();
    let long = prompts[3].clone();
    let windows = prompts[2].clone();
    for cut in [2, 9, 17, 30, 41, 60, 70] {
        prompts.push(long[..cut.min(long.len())].to_vec());
    }
    for skip in [3, 11, 25, 40, 50] {
        let mut p = vec![2];
        p.extend_from_slice(&windows[skip..]);
        prompts.push(p);
    }
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = GenerationRequest::new(p, 3 + (i * 5) % 10);
            r.ignore_eos = true;
            if i % 2 == 1 {
                r.sampling = SamplingParams {
                    temperature: 0.9,
                    top_k: Some(40),
                    seed: 1000 + i as u64,
                    ..SamplingParams::default()
                };
            }
            r
        })
        .collect()
}

fn alone(reqs: &[GenerationRequest]) -> Vec<Vec<u32>> {
    let mut e = engine("tiny-27b-text", KvCacheConfig::default(), sched(4096, 1));
    reqs.iter()
        .map(|r| e.generate(r, &mut |_| true).unwrap().token_ids)
        .collect()
}

/// The tiny 4B image prompt: its ids, transformers' greedy tokens and its image features.
fn image_chat() -> (Vec<u32>, Vec<u32>, Tensor) {
    let c = case("tiny-4b", "image_chat");
    let feats = candle_core::safetensors::load(fixture("tiny-4b/golden.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("image_chat.image_features")
        .unwrap();
    (ids(&c["prompt_ids"]), ids(&c["greedy_ids"]), feats)
}

/// Steps until nothing is left; the finished sequences with their token counts (a failure
/// fails the test).
fn run_to_end(e: &mut Engine) -> Vec<(u64, usize)> {
    let mut done = Vec::new();
    while e.has_work() {
        for ev in e.step().unwrap() {
            match ev {
                StepEvent::Finished { id, output } => done.push((id, output.token_ids.len())),
                StepEvent::Failed { error, .. } => panic!("{error}"),
                StepEvent::Token { .. } => {}
            }
        }
    }
    done
}

#[test]
fn a_batch_of_16_gives_each_request_its_own_tokens_at_every_chunk_size() {
    let reqs = sixteen();
    let want = alone(&reqs);
    // The golden cases are transformers' greedy tokens.
    for (i, name) in ["short_a", "long_windows"].iter().enumerate() {
        let g = ids(&case("tiny-27b-text", name)["greedy_ids"]);
        let n = reqs[i * 2].max_new_tokens;
        assert_eq!(want[i * 2], g[..n], "{name} alone");
    }
    for chunk in [1, 7, 16, 64, 512] {
        let mut e = engine("tiny-27b-text", KvCacheConfig::default(), sched(chunk, 64));
        let out = e.generate_batch(&reqs, &mut |_| true).unwrap();
        for (i, (o, w)) in out.iter().zip(&want).enumerate() {
            let o = o.as_ref().unwrap();
            assert_eq!(&o.token_ids, w, "request {i} at chunk {chunk}");
            assert_eq!(o.finish_reason, FinishReason::Length);
        }
        let st = e.stats();
        if chunk >= 512 {
            assert_eq!(st.max_batch, 16, "all 16 ran in one step at chunk {chunk}");
        }
        assert_eq!(e.kv_bytes_in_use(), 0);
        assert_eq!((st.running, st.waiting), (0, 0));
    }
}

#[test]
fn requests_joining_between_steps_and_preemption_keep_every_output() {
    // Long outputs, so that running sequences outgrow the cache after they started.
    let reqs: Vec<GenerationRequest> = sixteen()
        .into_iter()
        .map(|mut r| {
            r.max_new_tokens = 60;
            r
        })
        .collect();
    let want = alone(&reqs);
    // A cache too small for all 16 at once: the newest are preempted and recomputed.
    let (m, t) = load("tiny-27b-text");
    let probe = m.new_kv_cache(KvCacheConfig::default());
    let limit = 4 * probe.bytes_for_sequence(140, 16);
    let mut e = Engine::with_scheduler(
        m,
        t,
        KvCacheConfig {
            max_bytes: Some(limit),
            ..KvCacheConfig::default()
        },
        sched(16, 64),
    );
    let mut got: Vec<Option<Vec<u32>>> = vec![None; reqs.len()];
    let mut index = std::collections::HashMap::new();
    // Continuous batching: one new request joins after every step.
    let mut pending = reqs.iter().enumerate();
    loop {
        if let Some((i, r)) = pending.next() {
            index.insert(e.admit(r.clone()).unwrap(), i);
        }
        if !e.has_work() {
            break;
        }
        for ev in e.step().unwrap() {
            match ev {
                StepEvent::Finished { id, output } => got[index[&id]] = Some(output.token_ids),
                StepEvent::Failed { error, .. } => panic!("{error}"),
                StepEvent::Token { .. } => {}
            }
        }
        assert!(e.kv_bytes_in_use() <= limit, "the byte limit holds");
    }
    let st = e.stats();
    assert!(
        st.preemptions > 0,
        "the small cache forced preemptions: {st:?} limit {limit}"
    );
    assert!(st.max_batch > 1, "requests ran together");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.as_ref().unwrap(), w, "request {i}");
    }
    assert_eq!(e.kv_bytes_in_use(), 0);
}

#[test]
fn image_prompts_chunk_without_splitting_an_image() {
    let (prompt, want, feats) = image_chat();
    let text = ids(&case("tiny-4b", "text_chat")["prompt_ids"]);
    for chunk in [3, 5, 8, 16, 64] {
        let mut e = engine("tiny-4b", KvCacheConfig::default(), sched(chunk, 8));
        let mut img = GenerationRequest::new(prompt.clone(), want.len());
        img.ignore_eos = true;
        img.image_embeds = Some(feats.clone());
        let mut txt = GenerationRequest::new(text.clone(), 6);
        txt.ignore_eos = true;
        let out = e.generate_batch(&[txt, img], &mut |_| true).unwrap();
        assert_eq!(out[1].as_ref().unwrap().token_ids, want, "chunk {chunk}");
        assert_eq!(
            out[0].as_ref().unwrap().token_ids,
            ids(&case("tiny-4b", "text_chat")["greedy_ids"])[..6],
            "chunk {chunk}"
        );
    }
}

#[test]
fn cancel_frees_a_running_or_waiting_sequence_at_once() {
    let mut e = engine("tiny-27b-text", KvCacheConfig::default(), sched(64, 2));
    let long = ids(&case("tiny-27b-text", "long_windows")["prompt_ids"]);
    let mut r = GenerationRequest::new(long, 50);
    r.ignore_eos = true;
    let a = e.admit(r.clone()).unwrap();
    let b = e.admit(r.clone()).unwrap();
    let c = e.admit(r.clone()).unwrap();
    e.step().unwrap();
    e.step().unwrap();
    assert_eq!((e.stats().running, e.stats().waiting), (2, 1));
    assert!(e.is_waiting(c));
    let held = e.kv_bytes_in_use();
    let out = e.cancel(a).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.token_ids.len(), 2);
    assert!(e.kv_bytes_in_use() < held);
    let out = e.cancel(c).unwrap();
    assert!(out.token_ids.is_empty());
    assert!(e.cancel(c).is_none(), "gone");
    assert_eq!(run_to_end(&mut e), vec![(b, 50)]);
    assert_eq!(e.kv_bytes_in_use(), 0);
}

#[test]
fn limits_are_refused_at_admission_naming_them() {
    let mut e = engine(
        "tiny-27b-text",
        KvCacheConfig {
            max_bytes: Some(64 << 10),
            ..KvCacheConfig::default()
        },
        SchedulerConfig {
            max_input_tokens: Some(100),
            ..sched(32, 4)
        },
    );
    let err = e
        .admit(GenerationRequest::new(vec![5; 101], 2))
        .unwrap_err();
    assert!(matches!(
        err,
        EngineError::InputTooLong {
            tokens: 101,
            limit: 100
        }
    ));
    assert!(err.to_string().contains("--max-input-tokens"), "{err}");
    let err = e
        .admit(GenerationRequest::new(vec![5; 100], 2))
        .unwrap_err();
    assert!(matches!(err, EngineError::KvCapacity { .. }), "{err}");
    assert!(err.to_string().contains("--kv-cache-bytes"), "{err}");
    let err = e.admit(GenerationRequest::new(vec![], 2)).unwrap_err();
    assert!(err.to_string().contains("empty"));
}

#[test]
fn requests_a_forward_would_refuse_are_refused_alone_at_admission() {
    let mut e = engine("tiny-27b-text", KvCacheConfig::default(), sched(64, 4));
    let good = e
        .admit(GenerationRequest::new(vec![2, 5, 6, 7], 3))
        .unwrap();
    let mut r = GenerationRequest::new(vec![2, 5, 6, 7], 8);
    r.image_embeds = Some(Tensor::zeros((1, 8), candle_core::DType::F32, &Device::Cpu).unwrap());
    let err = e.admit(r).unwrap_err();
    assert!(err.to_string().contains("image"), "{err}");
    let err = e
        .admit(GenerationRequest::new(vec![2, 100_000], 3))
        .unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    // The batch the bad requests would have joined runs as if they never came.
    assert_eq!(run_to_end(&mut e), vec![(good, 3)]);
}

fn with_blocks(block_size: usize, prefix_caching: bool, model: &str) -> Engine {
    engine(
        model,
        KvCacheConfig {
            block_size,
            ..KvCacheConfig::default()
        },
        SchedulerConfig {
            prefix_caching,
            ..sched(32, 64)
        },
    )
}

#[test]
fn a_repeated_prefix_skips_its_prefill_and_changes_no_token() {
    let reqs = sixteen();
    for block_size in [4, 16] {
        let mut off = with_blocks(block_size, false, "tiny-27b-text");
        let want: Vec<Vec<u32>> = off
            .generate_batch(&reqs, &mut |_| true)
            .unwrap()
            .into_iter()
            .map(|o| o.unwrap().token_ids)
            .collect();
        assert_eq!(off.stats().prefix_hit_tokens, 0);
        let mut on = with_blocks(block_size, true, "tiny-27b-text");
        // Twice: the second round finds every prompt's full blocks cached.
        for round in 0..2 {
            let before = on.stats().prefix_hit_tokens;
            let got = on.generate_batch(&reqs, &mut |_| true).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    &g.as_ref().unwrap().token_ids,
                    w,
                    "request {i}, round {round}"
                );
            }
            let hits = on.stats().prefix_hit_tokens - before;
            if round == 1 {
                let full: usize = reqs
                    .iter()
                    .map(|r| (r.prompt_ids.len() - 1) / block_size * block_size)
                    .sum();
                assert_eq!(
                    hits as usize, full,
                    "every full prompt block hit (bs {block_size})"
                );
            }
        }
        assert_eq!(on.kv_bytes_in_use(), 0, "cached blocks are not in use");
    }
}

#[test]
fn image_prompts_share_a_prefix_only_with_the_same_image() {
    let (prompt, want, feats) = image_chat();
    let other = feats.affine(-4.0, 1.0).unwrap();
    let req = |f: &Tensor| {
        let mut r = GenerationRequest::new(prompt.clone(), want.len());
        r.ignore_eos = true;
        r.image_embeds = Some(f.clone());
        r
    };
    let mut alone = with_blocks(4, false, "tiny-4b");
    let other_want = alone
        .generate(&req(&other), &mut |_| true)
        .unwrap()
        .token_ids;
    assert_ne!(other_want, want, "another image gives other tokens");
    let mut e = with_blocks(4, true, "tiny-4b");
    assert_eq!(
        e.generate(&req(&feats), &mut |_| true).unwrap().token_ids,
        want
    );
    let before = e.stats().prefix_hit_tokens;
    assert_eq!(
        e.generate(&req(&other), &mut |_| true).unwrap().token_ids,
        other_want
    );
    assert_eq!(
        e.stats().prefix_hit_tokens,
        before,
        "no block shared across images"
    );
    assert_eq!(
        e.generate(&req(&feats), &mut |_| true).unwrap().token_ids,
        want
    );
    assert!(e.stats().prefix_hit_tokens > before, "the same image hits");
}

/// The paged KV layout (what CUDA always runs: per-layer pools, one attention op per layer for
/// every sequence) through the scheduler: the same 16 requests get the tokens each gets alone
/// on the CPU layout, with pools small enough that blocks are recycled and preemption happens;
/// a prompt its global pool cannot hold is refused at admission.
#[test]
fn the_paged_layout_gives_every_request_its_own_tokens() {
    let reqs = sixteen();
    let want = alone(&reqs);
    for (chunk, pools) in [(64, [400, 400]), (16, [40, 60])] {
        let kv = KvCacheConfig {
            block_size: 4,
            paged_blocks: Some(pools),
            ..KvCacheConfig::default()
        };
        let mut e = engine("tiny-27b-text", kv, sched(chunk, 16));
        let out = e.generate_batch(&reqs, &mut |_| true).unwrap();
        for (i, (o, w)) in out.iter().zip(&want).enumerate() {
            assert_eq!(
                &o.as_ref().unwrap().token_ids,
                w,
                "request {i}, pools {pools:?}"
            );
        }
        assert_eq!(e.kv_bytes_in_use(), 0);
    }
    let kv = KvCacheConfig {
        block_size: 4,
        max_bytes: Some(1 << 30),
        paged_blocks: Some([64, 16]),
    };
    let mut e = engine("tiny-27b-text", kv, sched(16, 4));
    let err = e.admit(GenerationRequest::new(vec![5; 64], 2)).unwrap_err();
    assert!(matches!(err, EngineError::KvCapacity { .. }), "{err}");
    assert!(e.admit(GenerationRequest::new(vec![5; 40], 2)).is_ok());
}
