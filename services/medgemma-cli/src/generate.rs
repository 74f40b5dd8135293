//! `medgemma generate`: one prompt through a model, printed as text or as one JSON object.
//!
//! This interface is a contract (other checks drive it): flags are only ever added.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use medgemma_engine::generate::{Engine, GenerationOutput, GenerationRequest, TokenEvent};
use medgemma_engine::sampling::SamplingParams;
use medgemma_model::{Gemma3, KvCacheConfig, LoadInfo, LoadOptions, ModelDType, Quantize};
use medgemma_tokenizer::{ChatMessage, ContentPart, ImageTokens, PromptEncoder, Tokenizer};
use medgemma_vision::{DecodeOptions, VisionEncoder};

/// Flags of `medgemma generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// A Hugging Face checkpoint directory or a .gguf file.
    #[arg(long, env = "MEDGEMMA_MODEL")]
    pub model: PathBuf,
    /// tokenizer.json or a directory holding it (default: the model directory's, or the GGUF's
    /// own vocabulary).
    #[arg(long, env = "MEDGEMMA_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// System prompt, folded into the first user turn as Gemma 3's template does.
    #[arg(long)]
    pub system: Option<String>,
    /// The user prompt.
    #[arg(long)]
    pub prompt: String,
    /// Image files placed before the prompt text, in order (PNG, JPEG, WebP, TIFF, DICOM).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The multimodal checkpoint whose SigLIP tower and projector encode `--image` (default:
    /// `--model` when it is a multimodal checkpoint directory).
    #[arg(long, env = "MEDGEMMA_VISION_MODEL")]
    pub vision_model: Option<PathBuf>,
    /// Encode `--image` with the demo's seeded random vision tower (for a text-only model such
    /// as the demo GGUF: the path runs for real, the embeddings carry no meaning).
    #[arg(long, conflicts_with = "vision_model")]
    pub demo_vision: bool,
    /// Which frame of a multi-frame DICOM `--image` to use (from 0).
    #[arg(long, default_value_t = 0)]
    pub image_frame: u32,
    /// Skip the chat template (BOS is still prepended).
    #[arg(long)]
    pub raw: bool,
    /// Run a GGUF model's weights dequantized to f32.
    #[arg(long)]
    pub dequantize: bool,
    /// Quantize safetensors weights at load: q8_0 or q4k (cached as GGUF in --cache-dir).
    #[arg(long, env = "MEDGEMMA_QUANTIZE")]
    pub quantize: Option<Quantize>,
    /// f32 or bf16 (default: f32 on cpu, bf16 on cuda). f16 is refused for Gemma 3.
    #[arg(long, env = "MEDGEMMA_DTYPE")]
    pub dtype: Option<ModelDType>,
    /// cpu, or cuda / cuda:N (needs a build with the `cuda` feature).
    #[arg(long, env = "MEDGEMMA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Where quantized models are cached (default: $MEDGEMMA_CACHE_DIR/quantized).
    #[arg(long, env = "MEDGEMMA_QUANT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most tokens to generate; 0 only tokenizes and prefills.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Do not stop on eos ids.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Constrain the output to this JSON schema (a file path or inline JSON).
    #[arg(long)]
    pub json_schema: Option<String>,
    /// Constrain the output to this regular expression.
    #[arg(long, conflicts_with = "json_schema")]
    pub regex: Option<String>,
    /// Report the top-N alternatives' logprobs of each token (with --json).
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The tokenizer as the generator service finds it (explicit path, model directory, GGUF
/// vocabulary), with the path in the error.
fn load_tokenizer(model: &Path, explicit: Option<&Path>) -> anyhow::Result<Tokenizer> {
    // The service error's message already holds its causes: keep it, not the chain again.
    medgemma_generator::load_tokenizer(model, explicit).map_err(|e| {
        anyhow::anyhow!(
            "loading the tokenizer of {}: {e}",
            explicit.unwrap_or(model).display()
        )
    })
}

pub fn load_options(
    dtype: Option<ModelDType>,
    device_spec: &str,
    quantize: Option<Quantize>,
    dequantize: bool,
    cache_dir: Option<PathBuf>,
) -> anyhow::Result<LoadOptions> {
    let progress: Option<medgemma_model::ProgressFn> = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading weights {bar:30} {pos}/{len} tensors")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(Arc::new(move |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            if done >= total {
                bar.finish_and_clear();
            }
        }))
    } else {
        None
    };
    let spec: medgemma_model::DeviceSpec = device_spec.parse()?;
    Ok(LoadOptions {
        dtype: dtype.unwrap_or(spec.default_dtype()),
        device: medgemma_generator::device(device_spec)?,
        quantize,
        dequantize,
        cache_dir: Some(cache_dir.unwrap_or_else(|| {
            medgemma_assets::quantization_cache_dir(&medgemma_assets::cache_dir())
        })),
        progress,
    })
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if a.raw && a.system.is_some() {
        bail!("--raw skips the chat template, so --system has nowhere to go; drop one of them");
    }
    if a.raw && !a.images.is_empty() {
        bail!("--raw skips the chat template, which places the images; drop --raw to use --image");
    }
    let opts = load_options(
        a.dtype,
        &a.device,
        a.quantize,
        a.dequantize,
        a.cache_dir.clone(),
    )?;
    let vision = if a.images.is_empty() {
        None
    } else {
        Some(load_vision(&a, &opts)?)
    };
    let tokenizer = load_tokenizer(&a.model, a.tokenizer.as_deref())?;
    let tokenizer = Arc::new(tokenizer);
    let prompt_ids = if a.raw {
        tokenizer.encode(&a.prompt, true)?
    } else {
        chat_prompt_ids(&a, &tokenizer, vision.as_ref())?
    };
    let mut model =
        Gemma3::load(&a.model, &opts).with_context(|| format!("loading {}", a.model.display()))?;
    let image_embeds = match &vision {
        None => None,
        Some(v) => {
            model
                .set_multimodal(v.config().to_model_config())
                .context("pairing the vision tower with the decoder")?;
            if v.config().text_hidden_size != model.config().text.hidden_size {
                bail!(
                    "the vision projector outputs {} wide embeddings; the decoder is {} wide",
                    v.config().text_hidden_size,
                    model.config().text.hidden_size
                );
            }
            Some(encode_images(v, &a.images, a.image_frame, model.dtype())?)
        }
    };
    let info = model.info().clone();
    tracing::info!(format = %info.format, weight_bytes = info.weight_bytes, types = ?info.tensor_types, "model loaded");
    let constraint = constraint(&a)?;
    let req = GenerationRequest {
        prompt_ids,
        image_embeds,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            frequency_penalty: a.frequency_penalty,
            presence_penalty: a.presence_penalty,
            seed: a.seed,
            top_logprobs: a.top_logprobs,
        },
        max_new_tokens: a.max_new_tokens,
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        constraint,
        logprob_token_ids: Vec::new(),
    };
    let mut engine = Engine::new(Arc::new(model), tokenizer, KvCacheConfig::default());
    let stream = !a.json;
    let mut stdout = std::io::stdout();
    let out = engine.generate(&req, &mut |ev: &TokenEvent<'_>| {
        if stream && !ev.text_delta.is_empty() {
            let _ = stdout.write_all(ev.text_delta.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if a.json {
        print_json(&a, &engine, &out, &info);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {}, prefill {:.1} tok/s, decode {:.1} tok/s]",
            out.prompt_token_ids.len(),
            out.token_ids.len(),
            out.finish_reason.as_str(),
            out.prefill_tokens_per_s(),
            out.decode_tokens_per_s()
        );
    }
    Ok(())
}

/// The vision tower for `--image`: `--vision-model`, the demo tower, or `--model` itself.
/// The `--json-schema` (a file or inline JSON) or `--regex` constraint, if any.
fn constraint(
    a: &GenerateArgs,
) -> anyhow::Result<Option<medgemma_engine::constraint::ConstraintSpec>> {
    Ok(match (&a.json_schema, &a.regex) {
        (Some(s), _) => {
            let text = if Path::new(s).exists() {
                std::fs::read_to_string(s)?
            } else {
                s.clone()
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).context("--json-schema is not valid JSON")?;
            Some(medgemma_engine::constraint::ConstraintSpec::JsonSchema(v))
        }
        (None, Some(r)) => Some(medgemma_engine::constraint::ConstraintSpec::Regex(
            r.clone(),
        )),
        (None, None) => None,
    })
}

/// The `--json` object on stdout.
fn print_json(a: &GenerateArgs, engine: &Engine, out: &GenerationOutput, info: &LoadInfo) {
    let tok = engine.tokenizer();
    let logprobs: Vec<serde_json::Value> = out
        .logprobs
        .iter()
        .map(|s| {
            serde_json::json!({
                "token_id": s.token,
                "logprob": s.logprob,
                "top": s.top.iter().map(|(id, lp)| serde_json::json!({"token_id": id, "token": tok.id_to_token(*id), "logprob": lp})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let j = serde_json::json!({
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": out.token_ids,
        "text": out.text,
        "finish_reason": out.finish_reason.as_str(),
        "prompt_tokens": out.prompt_token_ids.len(),
        "completion_tokens": out.token_ids.len(),
        "prefill_tokens_per_s": out.prefill_tokens_per_s(),
        "decode_tokens_per_s": out.decode_tokens_per_s(),
        "prefill_seconds": out.prefill_time.as_secs_f64(),
        "decode_seconds": out.decode_time.as_secs_f64(),
        "kv_cache_bytes_peak": out.kv_bytes_peak,
        "logprobs": logprobs,
        "model": {
            "path": a.model,
            "format": info.format,
            "weight_bytes": info.weight_bytes,
            "tensor_types": info.tensor_types,
            "quantization_cache": info.cache_file,
        },
    });
    println!("{j}");
}

/// The prompt as one user turn (after the system prompt, images first) through the prompt
/// pipeline: the model's own template or the Gemma 3 one, the text of `--prompt` and `--system`
/// as ordinary text (a `<start_of_turn>` typed in it cannot forge a turn).
fn chat_prompt_ids(
    a: &GenerateArgs,
    tokenizer: &Arc<Tokenizer>,
    vision: Option<&VisionEncoder>,
) -> anyhow::Result<Vec<u32>> {
    // Gemma 3's 256 soft tokens per image; with --image the vision config's count replaces it.
    let mut encoder = PromptEncoder::new(tokenizer.clone(), &medgemma_assets::cache_dir(), 256)
    .context(
        "the model carries no chat template and the Gemma 3 template from the fetched tokenizer is missing (run `medgemma fetch-demo`, or pass --raw)",
    )?;
    if let Some(note) = encoder.template().fallback_notice() {
        eprintln!("{note}");
    }
    if let Some(v) = vision {
        let c = v.config();
        let tokens = ImageTokens::from_ids(
            tokenizer,
            c.boi_token_index,
            c.image_token_index,
            c.eoi_token_index,
            c.mm_tokens_per_image,
        )
        .context("the tokenizer lacks the model's image tokens")?;
        encoder = encoder.with_image_tokens(tokens);
    }
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    let mut parts = vec![ContentPart::Image; a.images.len()];
    parts.push(ContentPart::Text(a.prompt.clone()));
    messages.push(ChatMessage::new("user", parts));
    Ok(encoder.encode_chat(&messages, true, None)?.ids)
}

fn load_vision(a: &GenerateArgs, opts: &LoadOptions) -> anyhow::Result<VisionEncoder> {
    let dtype = opts.dtype.to_candle()?;
    if a.demo_vision {
        let hidden = medgemma_model::ModelConfig::from_path(&a.model)?
            .text
            .hidden_size;
        eprintln!(
            "--demo-vision: a seeded RANDOM SigLIP tower encodes the images; the model cannot see them"
        );
        return Ok(VisionEncoder::demo(hidden, 0, &opts.device, dtype)?);
    }
    let dir = a.vision_model.as_ref().unwrap_or(&a.model);
    if !dir.is_dir() {
        bail!(
            "--image needs a vision tower: {} is not a multimodal checkpoint directory (pass \
             --vision-model DIR, or --demo-vision for the demo's random tower)",
            dir.display()
        );
    }
    VisionEncoder::load(dir, &opts.device, dtype)
        .with_context(|| format!("loading the vision tower of {}", dir.display()))
}

/// Every image decoded, preprocessed and encoded: `[images * tokens, hidden]` in `dtype`.
fn encode_images(
    v: &VisionEncoder,
    paths: &[PathBuf],
    frame: u32,
    dtype: candle_core::DType,
) -> anyhow::Result<candle_core::Tensor> {
    let opts = DecodeOptions {
        frame,
        ..DecodeOptions::default()
    };
    let mut rows = Vec::with_capacity(paths.len());
    for p in paths {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let e = v
            .encode_bytes(&bytes, &opts)
            .with_context(|| format!("image {}", p.display()))?;
        rows.push(e.to_dtype(dtype)?);
    }
    Ok(candle_core::Tensor::cat(&rows, 0)?)
}
