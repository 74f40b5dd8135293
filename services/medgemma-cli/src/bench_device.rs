//! `medgemma bench-device`: prefill and decode of a full-size MedGemma-4B-shaped decoder with
//! seeded random weights at several batch sizes (and the full-size SigLIP tower), on the GPU,
//! with the achieved fraction of the device's memory bandwidth during decode; beside
//! transformers on the same weights when `tools/device/check.sh` could run it. Writes
//! `bench.json` and `bench.md` under `--out`. `tools/device/check.sh` drives it; `--shape tiny`
//! is its CPU dry run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use medgemma_model::{DeviceSpec, Gemma3, KvCacheConfig, LoadOptions, LogitsRows, SeqInput};
use serde_json::{Value, json};

/// Flags of `medgemma bench-device`.
#[derive(Debug, clap::Args)]
pub struct BenchDeviceArgs {
    /// The random checkpoint's directory: written there first when it holds none.
    #[arg(long)]
    pub model: PathBuf,
    /// Only write the checkpoint (for the transformers side), then exit.
    #[arg(long)]
    pub write_only: bool,
    /// `4b` (MedGemma 4B's decoder and SigLIP so400m) or `tiny` (the CPU dry run).
    #[arg(long, default_value = "4b")]
    pub shape: String,
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Batch sizes (sequences at once; images at once for the tower).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batches: Vec<usize>,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The device's peak memory bandwidth in GB/s (default: from its memory clock and bus).
    #[arg(long)]
    pub peak_bandwidth_gbs: Option<f64>,
    /// transformers' figures on the same checkpoint (`tools/device/bench_transformers.py`).
    #[arg(long)]
    pub transformers_json: Option<PathBuf>,
    /// Where bench.json and bench.md go.
    #[arg(long)]
    pub out: PathBuf,
}

/// The decoder shapes: MedGemma 4B's text decoder, or a tiny one for the dry run.
fn text_config(shape: &str) -> anyhow::Result<Value> {
    let (hidden, inter, layers, heads, kv, hd, vocab) = match shape {
        "4b" => (2560, 10240, 34, 8, 4, 256, 262_208),
        "tiny" => (256, 512, 6, 2, 1, 128, 4096),
        other => bail!("--shape {other:?}: expected 4b or tiny"),
    };
    Ok(json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hd, "query_pre_attn_scalar": hd, "sliding_window": 1024,
        "sliding_window_pattern": 6, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "torch_dtype": "bfloat16", "eos_token_id": [1, 106]
    }))
}

/// Seeded uniform values of variance `std^2`, in bf16.
fn random_bf16(n: usize, std: f32, seed: u64) -> Vec<half::bf16> {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let a = std * 3f32.sqrt();
    (0..n)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let u = (rng >> 40) as f32 / (1u64 << 24) as f32;
            half::bf16::from_f32((2.0 * u - 1.0) * a)
        })
        .collect()
}

/// Writes the random checkpoint (bf16, text layout, one shard per layer) unless present.
fn write_checkpoint(dir: &Path, cfg: &Value, seed: u64) -> anyhow::Result<()> {
    if dir.join("model.safetensors.index.json").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let g = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let (h, ff, hd) = (g("hidden_size"), g("intermediate_size"), g("head_dim"));
    let (q, kv) = (g("num_attention_heads") * hd, g("num_key_value_heads") * hd);
    let mut map = serde_json::Map::new();
    let mut n = 0u64;
    let mut shard = |name: &str, tensors: Vec<(String, Vec<usize>, f32)>| -> anyhow::Result<()> {
        let mut ts = std::collections::HashMap::new();
        for (t, shape, std) in tensors {
            n += 1;
            let len = shape.iter().product();
            let v = Tensor::from_vec(random_bf16(len, std, seed ^ n), shape, &Device::Cpu)?;
            map.insert(t.clone(), json!(name));
            ts.insert(t, v);
        }
        candle_core::safetensors::save(&ts, dir.join(name))?;
        Ok(())
    };
    let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    shard(
        "embed.safetensors",
        vec![
            (
                "model.embed_tokens.weight".into(),
                vec![g("vocab_size"), h],
                0.03,
            ),
            ("model.norm.weight".into(), vec![h], 0.1),
        ],
    )?;
    for i in 0..g("num_hidden_layers") {
        let p = |w: &str| format!("model.layers.{i}.{w}.weight");
        shard(
            &format!("layer-{i:03}.safetensors"),
            vec![
                (p("input_layernorm"), vec![h], 0.1),
                (p("post_attention_layernorm"), vec![h], 0.1),
                (p("pre_feedforward_layernorm"), vec![h], 0.1),
                (p("post_feedforward_layernorm"), vec![h], 0.1),
                (p("self_attn.q_norm"), vec![hd], 0.1),
                (p("self_attn.k_norm"), vec![hd], 0.1),
                (p("self_attn.q_proj"), vec![q, h], s(h)),
                (p("self_attn.k_proj"), vec![kv, h], s(h)),
                (p("self_attn.v_proj"), vec![kv, h], s(h)),
                (p("self_attn.o_proj"), vec![h, q], s(q)),
                (p("mlp.gate_proj"), vec![ff, h], s(h)),
                (p("mlp.up_proj"), vec![ff, h], s(h)),
                (p("mlp.down_proj"), vec![h, ff], s(ff)),
            ],
        )?;
    }
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(cfg)?)?;
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index)?,
    )?;
    Ok(())
}

/// The pools one run needs: every sequence's prompt and decode, plus a block each.
fn kv_for(batch: usize, positions: usize, device: &Device) -> KvCacheConfig {
    let bs = medgemma_model::DEFAULT_BLOCK_SIZE;
    let global = batch * (positions.div_ceil(bs) + 1);
    // A prompt is prefilled in one chunk, so its sliding layers hold all of it at once.
    let sliding = batch * (positions.div_ceil(bs) + 2);
    KvCacheConfig {
        block_size: bs,
        max_bytes: None,
        paged_blocks: device.is_cuda().then_some([sliding, global]),
    }
}

struct DecoderRun {
    batch: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    step_ms: f64,
    bytes_per_step: f64,
}

/// Prefill `batch` random prompts (sequences packed into steps of up to 8,192 rows), then
/// `steps` greedy decode steps of all of them; each phase synchronised and timed.
fn run_decoder(m: &Gemma3, a: &BenchDeviceArgs, batch: usize) -> anyhow::Result<DecoderRun> {
    let cfg = m.config().clone();
    let (p, d) = (a.prompt_tokens, a.decode_steps);
    let mut kv = m.new_kv_cache(kv_for(batch, p + d, m.device()));
    let mut seqs: Vec<_> = (0..batch).map(|_| kv.new_sequence()).collect();
    let vocab = cfg.text.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..batch as u64)
        .map(|b| {
            (0..p as u64)
                .map(|i| (3 + (b * 7919 + i * 104_729) % (vocab - 3)) as u32)
                .collect()
        })
        .collect();
    let per_step = (8192 / p.max(1)).max(1);
    m.device().synchronize()?;
    let t = Instant::now();
    let mut next = vec![0u32; batch];
    for (chunk_seqs, chunk_prompts) in seqs.chunks_mut(per_step).zip(prompts.chunks(per_step)) {
        let mut inputs: Vec<SeqInput<'_>> = chunk_seqs
            .iter_mut()
            .zip(chunk_prompts)
            .map(|(s, pr)| SeqInput {
                kv: s,
                tokens: pr,
                image_embeds: None,
                logits: LogitsRows::Last,
            })
            .collect();
        let out = m.forward(&mut kv, &mut inputs)?;
        drop(inputs);
        let _ = argmax_rows(&out)?;
    }
    m.device().synchronize()?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..d {
        let toks: Vec<[u32; 1]> = next.iter().map(|&x| [x]).collect();
        let mut inputs: Vec<SeqInput<'_>> = seqs
            .iter_mut()
            .zip(&toks)
            .map(|(s, tk)| SeqInput {
                kv: s,
                tokens: tk,
                image_embeds: None,
                logits: LogitsRows::Last,
            })
            .collect();
        let out = m.forward(&mut kv, &mut inputs)?;
        drop(inputs);
        next = argmax_rows(&out)?;
    }
    m.device().synchronize()?;
    let decode_s = t.elapsed().as_secs_f64();
    for s in &mut seqs {
        kv.release(s);
    }
    // Bytes a decode step reads: every weight once, and each sequence's cached keys and
    // values (global layers: the whole context; sliding layers: the window), at the middle
    // of the decode phase.
    let t = &cfg.text;
    let ctx = p + d / 2;
    let elem = m.dtype().size_in_bytes();
    let per_layer_tok = 2 * t.num_key_value_heads * t.head_dim * elem;
    let kv_read: usize = t
        .layer_types
        .iter()
        .map(|k| match k {
            medgemma_model::LayerType::Global => ctx,
            medgemma_model::LayerType::Sliding => ctx.min(t.sliding_window),
        })
        .sum::<usize>()
        * per_layer_tok
        * batch;
    let step_s = decode_s / d.max(1) as f64;
    Ok(DecoderRun {
        batch,
        prefill_tok_s: (batch * p) as f64 / prefill_s,
        decode_tok_s: (batch * d) as f64 / decode_s,
        step_ms: step_s * 1e3,
        bytes_per_step: (m.info().weight_bytes + kv_read) as f64,
    })
}

fn argmax_rows(out: &[Option<Tensor>]) -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::with_capacity(out.len());
    for o in out.iter().flatten() {
        let a: Vec<u32> = o
            .argmax_keepdim(candle_core::D::Minus1)?
            .flatten_all()?
            .to_vec1()?;
        ids.extend(a);
    }
    Ok(ids)
}

/// Images per second of the SigLIP tower (full-size so400m for `4b`, the demo tower for
/// `tiny`) with seeded random weights, for `batch` synthetic images at once.
fn run_tower(a: &BenchDeviceArgs, device: &Device, dtype: DType) -> anyhow::Result<Vec<Value>> {
    let enc = match a.shape.as_str() {
        "4b" => {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/configs/medgemma-4b-it.json");
            let v: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            let cfg = medgemma_vision::VisionModelConfig::from_hf_json(&v)?;
            medgemma_vision::VisionEncoder::random(cfg, a.seed, device, dtype)?
        }
        _ => medgemma_vision::VisionEncoder::demo(256, a.seed, device, dtype)?,
    };
    let img = synthetic_png(512, 384)?;
    let mut rows = Vec::new();
    for &b in &a.batches {
        let images: Vec<(&[u8], medgemma_vision::DecodeOptions)> = (0..b)
            .map(|_| (img.as_slice(), Default::default()))
            .collect();
        enc.encode_bytes_batch(&images[..1])?;
        device.synchronize()?;
        let t = Instant::now();
        let out = enc.encode_bytes_batch(&images)?;
        device.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        anyhow::ensure!(out.iter().all(|r| r.is_ok()), "an image failed to encode");
        rows.push(json!({"batch": b, "images_per_s": b as f64 / s, "s": s}));
    }
    Ok(rows)
}

fn synthetic_png(w: u32, h: u32) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    Ok(buf)
}

pub fn run(a: BenchDeviceArgs) -> anyhow::Result<()> {
    let cfg = text_config(&a.shape)?;
    write_checkpoint(&a.model, &cfg, a.seed)?;
    if a.write_only {
        println!("random {} checkpoint in {}", a.shape, a.model.display());
        return Ok(());
    }
    let spec: DeviceSpec = a.device.parse()?;
    let device = spec.open()?;
    let dtype = spec.default_dtype();
    let t = Instant::now();
    let m = Gemma3::load(
        &a.model,
        &LoadOptions {
            dtype,
            device: device.clone(),
            ..Default::default()
        },
    )?;
    let load_s = t.elapsed().as_secs_f64();
    let peak = a
        .peak_bandwidth_gbs
        .or_else(|| medgemma_model::device::peak_bandwidth_gbs(&device));
    let name = medgemma_model::device::name(&device);
    let mut decoder = Vec::new();
    for &b in &a.batches {
        // One short warm-up (kernel loading, NVRTC, cuBLAS handles), then the timed run.
        let warm = BenchDeviceArgs {
            prompt_tokens: 16.min(a.prompt_tokens),
            decode_steps: 2,
            ..a.clone_shallow()
        };
        run_decoder(&m, &warm, 1)?;
        let r = run_decoder(&m, &a, b)?;
        let gbs = r.bytes_per_step / (r.step_ms / 1e3) / 1e9;
        decoder.push(json!({
            "batch": r.batch,
            "prefill_tok_s": r.prefill_tok_s,
            "decode_tok_s": r.decode_tok_s,
            "decode_step_ms": r.step_ms,
            "decode_gb_read_per_step": r.bytes_per_step / 1e9,
            "decode_achieved_gbs": gbs,
            "decode_bandwidth_fraction": peak.map(|p| gbs / p),
        }));
        eprintln!("batch {b}: {}", decoder.last().unwrap_or(&Value::Null));
    }
    let tower = run_tower(&a, &device, dtype.to_candle()?)?;
    let theirs: Option<Value> = match &a.transformers_json {
        Some(p) if p.exists() => Some(serde_json::from_slice(&std::fs::read(p)?)?),
        _ => None,
    };
    let report = json!({
        "device": name, "shape": a.shape, "dtype": format!("{dtype:?}"),
        "weights_gb": m.info().weight_bytes as f64 / 1e9, "load_s": load_s,
        "peak_bandwidth_gbs": peak, "prompt_tokens": a.prompt_tokens,
        "decode_steps": a.decode_steps, "decoder": decoder, "siglip": tower,
        "transformers": theirs,
    });
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join("bench.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    let md = markdown(&report);
    std::fs::File::create(a.out.join("bench.md"))?.write_all(md.as_bytes())?;
    print!("{md}");
    Ok(())
}

impl BenchDeviceArgs {
    fn clone_shallow(&self) -> Self {
        Self {
            model: self.model.clone(),
            write_only: false,
            shape: self.shape.clone(),
            device: self.device.clone(),
            batches: self.batches.clone(),
            prompt_tokens: self.prompt_tokens,
            decode_steps: self.decode_steps,
            seed: self.seed,
            peak_bandwidth_gbs: self.peak_bandwidth_gbs,
            transformers_json: None,
            out: self.out.clone(),
        }
    }
}

fn f(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.1}"))
}

/// The Markdown table of a report (ours, and transformers' rows where present).
fn markdown(r: &Value) -> String {
    let mut s = format!(
        "device: {} | shape: {} | dtype: {} | weights {:.2} GB | peak bandwidth {} GB/s\n\n",
        r["device"].as_str().unwrap_or("?"),
        r["shape"].as_str().unwrap_or("?"),
        r["dtype"].as_str().unwrap_or("?"),
        r["weights_gb"].as_f64().unwrap_or(0.0),
        f(&r["peak_bandwidth_gbs"]),
    );
    s += "| engine | batch | prefill tok/s | decode tok/s | decode step ms | decode GB/s | of peak |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|\n";
    let empty = Vec::new();
    for row in r["decoder"].as_array().unwrap_or(&empty) {
        s += &format!(
            "| medgemma-serve | {} | {} | {} | {} | {} | {} |\n",
            row["batch"],
            f(&row["prefill_tok_s"]),
            f(&row["decode_tok_s"]),
            f(&row["decode_step_ms"]),
            f(&row["decode_achieved_gbs"]),
            row["decode_bandwidth_fraction"]
                .as_f64()
                .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
        );
    }
    for row in r["transformers"]["decoder"].as_array().unwrap_or(&empty) {
        s += &format!(
            "| {} | {} | {} | {} | {} | - | - |\n",
            r["transformers"]["engine"]
                .as_str()
                .unwrap_or("transformers"),
            row["batch"],
            f(&row["prefill_tok_s"]),
            f(&row["decode_tok_s"]),
            f(&row["decode_step_ms"]),
        );
    }
    s += "\n| SigLIP tower | batch | images/s |\n|---|---:|---:|\n";
    for row in r["siglip"].as_array().unwrap_or(&empty) {
        s += &format!(
            "| medgemma-serve | {} | {} |\n",
            row["batch"],
            f(&row["images_per_s"])
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use medgemma_model::ModelConfig;

    #[test]
    fn the_4b_fixture_is_a_full_size_siglip_and_decoder() {
        let v = medgemma_test_support::read_json(medgemma_test_support::fixture(
            "configs/medgemma-4b-it.json",
        ));
        let cfg = medgemma_vision::VisionModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(
            (
                cfg.vision.hidden_size,
                cfg.vision.num_hidden_layers,
                cfg.vision.image_size
            ),
            (1152, 27, 896)
        );
        assert_eq!(cfg.text_hidden_size, 2560);
        let ours = ModelConfig::from_hf_json(&text_config("4b").unwrap(), Path::new("x")).unwrap();
        let real = ModelConfig::from_hf_json(&v, Path::new("y")).unwrap();
        assert_eq!(ours.text.hidden_size, real.text.hidden_size);
        assert_eq!(ours.text.layer_types, real.text.layer_types);
        assert_eq!(ours.text.num_key_value_heads, real.text.num_key_value_heads);
    }

    #[test]
    fn markdown_has_a_row_per_batch_and_engine() {
        let r = json!({"device": "NVIDIA H100", "shape": "4b", "dtype": "BF16",
            "weights_gb": 8.6, "peak_bandwidth_gbs": 3352.0,
            "decoder": [{"batch": 1, "prefill_tok_s": 1000.0, "decode_tok_s": 90.0,
                "decode_step_ms": 11.1, "decode_achieved_gbs": 780.0,
                "decode_bandwidth_fraction": 0.233}],
            "transformers": {"engine": "transformers 5", "decoder": [{"batch": 1,
                "prefill_tok_s": 900.0, "decode_tok_s": 40.0, "decode_step_ms": 25.0}]},
            "siglip": [{"batch": 8, "images_per_s": 55.5}]});
        let md = markdown(&r);
        assert!(
            md.contains("| medgemma-serve | 1 | 1000.0 | 90.0 | 11.1 | 780.0 | 23% |"),
            "{md}"
        );
        assert!(
            md.contains("| transformers 5 | 1 | 900.0 | 40.0 | 25.0 | - | - |"),
            "{md}"
        );
        assert!(md.contains("| medgemma-serve | 8 | 55.5 |"), "{md}");
    }

    #[test]
    fn random_weights_are_seeded_with_the_asked_variance() {
        let a = random_bf16(10_000, 0.5, 1);
        assert_eq!(a, random_bf16(10_000, 0.5, 1));
        assert_ne!(a, random_bf16(10_000, 0.5, 2));
        let var = a.iter().map(|x| x.to_f32().powi(2)).sum::<f32>() / a.len() as f32;
        assert!((var - 0.25).abs() < 0.02, "{var}");
    }
}
