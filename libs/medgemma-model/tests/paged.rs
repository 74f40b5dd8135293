//! The GPU-shaped path (paged KV pools, one attention op per layer for every sequence, masks
//! computed in the op) against the committed transformers goldens and against the CPU path.
//!
//! Runs on the CPU here (the op's CPU implementation); `MEDGEMMA_TEST_DEVICE=cuda` runs the
//! same tests on a GPU (the NVRTC kernels), as `tools/device/check.sh` does, with the f32
//! tolerance the device check promises (1e-3; CPU 1e-4).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{argmax, case, golden, ids, max_abs_diff, repo_root};
use medgemma_model::{
    DeviceSpec, Gemma3, KvCache, KvCacheConfig, LoadOptions, LogitsRows, ModelDType, SeqInput,
};

fn device() -> Device {
    let spec = std::env::var("MEDGEMMA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    DeviceSpec::open_str(&spec).expect("MEDGEMMA_TEST_DEVICE")
}

fn tol() -> f32 {
    if device().is_cpu() { 1e-4 } else { 1e-3 }
}

fn load(model: &str, dtype: ModelDType, device: &Device) -> Gemma3 {
    Gemma3::load(
        &repo_root().join("fixtures").join(model),
        &LoadOptions {
            dtype,
            device: device.clone(),
            ..Default::default()
        },
    )
    .unwrap()
}

/// A paged cache (what CUDA always gets) with small pools, so block ids wrap and interleave.
fn paged(m: &Gemma3, block_size: usize) -> KvCache {
    let kv = m.new_kv_cache(KvCacheConfig {
        block_size,
        max_bytes: None,
        paged_blocks: Some([48, 160]),
    });
    assert!(kv.is_paged());
    kv
}

fn to_cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Prefill in chunks of `chunk` rows (all logits), then greedy decode of `steps` tokens.
fn run(
    m: &Gemma3,
    kv: &mut KvCache,
    prompt: &[u32],
    embeds: Option<&Tensor>,
    chunk: usize,
    steps: usize,
) -> (Tensor, Vec<u32>) {
    let mut s = kv.new_sequence();
    let mut rows = Vec::new();
    let mut embeds = embeds.map(|e| e.to_device(m.device()).unwrap());
    // An image is never split across chunks: a prompt with images is prefilled at once.
    let chunk = if embeds.is_some() {
        prompt.len()
    } else {
        chunk
    };
    for part in prompt.chunks(chunk) {
        let e = embeds.take();
        let lg = m
            .forward(
                kv,
                &mut [SeqInput {
                    kv: &mut s,
                    tokens: part,
                    image_embeds: e.as_ref(),
                    logits: LogitsRows::All,
                }],
            )
            .unwrap();
        rows.push(to_cpu(lg[0].as_ref().unwrap()));
    }
    let logits = Tensor::cat(&rows, 0).unwrap();
    let mut next = argmax(&logits.get(logits.dim(0).unwrap() - 1).unwrap());
    let mut out = vec![next];
    while out.len() < steps {
        let lg = m
            .forward(
                kv,
                &mut [SeqInput {
                    kv: &mut s,
                    tokens: &[next],
                    image_embeds: None,
                    logits: LogitsRows::Last,
                }],
            )
            .unwrap();
        next = argmax(&to_cpu(lg[0].as_ref().unwrap()).get(0).unwrap());
        out.push(next);
    }
    kv.release(&mut s);
    (logits, out)
}

#[test]
fn paged_f32_matches_the_goldens_across_sliding_windows() {
    let dev = device();
    let (m, g) = (
        load("tiny-27b-text", ModelDType::F32, &dev),
        golden("tiny-27b-text"),
    );
    for name in ["long_windows", "chat_system_zh"] {
        let c = case(&g, name);
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["greedy_ids"]);
        for (chunk, bs) in [(prompt.len(), 16), (5, 4)] {
            let mut kv = paged(&m, bs);
            let (logits, greedy) = run(&m, &mut kv, &prompt, None, chunk, want.len());
            let d = max_abs_diff(&logits, &g.tensors[&format!("{name}.logits")]);
            assert!(
                d <= tol(),
                "{name} (chunks {chunk}, blocks {bs}): logits differ by {d}"
            );
            assert_eq!(greedy, want, "{name} (chunks {chunk}, blocks {bs}): greedy");
            assert_eq!(kv.bytes_in_use(), 0);
        }
    }
}

#[test]
fn paged_bf16_greedy_equals_the_bf16_goldens() {
    let dev = device();
    let (m, g) = (
        load("tiny-27b-text", ModelDType::BF16, &dev),
        golden("tiny-27b-text"),
    );
    for c in &g.cases {
        let name = c["name"].as_str().unwrap();
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["greedy_ids_bf16"]);
        let mut kv = paged(&m, 16);
        let (logits, greedy) = run(&m, &mut kv, &prompt, None, prompt.len(), want.len());
        let golden = &g.tensors[&format!("{name}.logits_bf16")];
        let scale = golden.abs().unwrap().max_all().unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
        let d = max_abs_diff(&logits, golden);
        assert!(d <= 0.04 * scale, "{name}: bf16 logits differ by {d}");
        assert_eq!(greedy, want, "{name}: bf16 greedy");
    }
}

#[test]
fn paged_image_prompt_matches_the_goldens() {
    let dev = device();
    let (m, g) = (load("tiny-4b", ModelDType::F32, &dev), golden("tiny-4b"));
    let c = case(&g, "image_chat");
    let prompt = ids(&c["prompt_ids"]);
    let want = ids(&c["greedy_ids"]);
    let feats = &g.tensors["image_chat.image_features"];
    let mut kv = paged(&m, 4);
    let (logits, greedy) = run(&m, &mut kv, &prompt, Some(feats), prompt.len(), want.len());
    let d = max_abs_diff(&logits, &g.tensors["image_chat.logits"]);
    assert!(d <= tol(), "image prompt logits differ by {d}");
    assert_eq!(greedy, want);
}

/// Several sequences in one step (prefill of one beside decode rows of others), each at its
/// own length, against each one run alone on the CPU path.
#[test]
fn paged_batch_of_sequences_equals_each_alone() {
    let dev = device();
    let m = load("tiny-27b-text", ModelDType::F32, &dev);
    let cpu = load("tiny-27b-text", ModelDType::F32, &Device::Cpu);
    let g = golden("tiny-27b-text");
    let prompts: Vec<Vec<u32>> = ["short_a", "short_b", "long_windows"]
        .iter()
        .map(|n| ids(&case(&g, n)["prompt_ids"]))
        .collect();
    let mut kv = paged(&m, 4);
    let mut seqs: Vec<_> = prompts.iter().map(|_| kv.new_sequence()).collect();
    let mut got: Vec<Vec<Tensor>> = vec![Vec::new(); prompts.len()];
    // Step 0: prompts 0 and 1 prefill. Step 1: they decode while prompt 2 prefills. Then all
    // decode together.
    let mut next: Vec<Vec<u32>> = vec![prompts[0].clone(), prompts[1].clone(), Vec::new()];
    for step in 0..6 {
        if step == 1 {
            next[2] = prompts[2].clone();
        }
        let mut batch: Vec<SeqInput<'_>> = seqs
            .iter_mut()
            .zip(&next)
            .map(|(s, t)| SeqInput {
                kv: s,
                tokens: t,
                image_embeds: None,
                logits: LogitsRows::Last,
            })
            .collect();
        let out = m.forward(&mut kv, &mut batch).unwrap();
        drop(batch);
        for (i, o) in out.iter().enumerate() {
            if let Some(o) = o {
                let o = to_cpu(o);
                next[i] = vec![argmax(&o.get(0).unwrap())];
                got[i].push(o);
            }
        }
    }
    for (i, p) in prompts.iter().enumerate() {
        let mut ckv = cpu.new_kv_cache(KvCacheConfig::default());
        assert!(!ckv.is_paged(), "the CPU keeps its own layout");
        let mut s = ckv.new_sequence();
        let mut toks = p.clone();
        for (j, want_row) in got[i].iter().enumerate() {
            let lg = cpu
                .forward(
                    &mut ckv,
                    &mut [SeqInput {
                        kv: &mut s,
                        tokens: &toks,
                        image_embeds: None,
                        logits: LogitsRows::Last,
                    }],
                )
                .unwrap();
            let alone = lg[0].as_ref().unwrap();
            let d = max_abs_diff(alone, want_row);
            assert!(d <= tol(), "sequence {i} step {j}: batched differs by {d}");
            toks = vec![argmax(&alone.get(0).unwrap())];
        }
    }
}

#[test]
fn a_full_pool_is_a_limit_error_and_can_reserve_says_so() {
    let m = load("tiny-27b-text", ModelDType::F32, &Device::Cpu);
    let mut kv = m.new_kv_cache(KvCacheConfig {
        block_size: 4,
        max_bytes: None,
        paged_blocks: Some([4, 3]),
    });
    assert!(kv.fits_pools(12, 4) && !kv.fits_pools(13, 4));
    let s = kv.new_sequence();
    assert!(kv.can_reserve(&s, 12));
    assert!(
        !kv.can_reserve(&s, 13),
        "3 global blocks of 4 hold 12 positions"
    );
    let mut s = s;
    let e = m
        .forward(
            &mut kv,
            &mut [SeqInput {
                kv: &mut s,
                tokens: &[2; 13],
                image_embeds: None,
                logits: LogitsRows::Last,
            }],
        )
        .unwrap_err();
    assert!(e.to_string().contains("KV cache is full"), "{e}");
}
