//! The generator's command line (every flag also reads a `MEDGEMMA_*` variable) and model
//! loading, with the same options as `medgemma generate`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use medgemma_engine::generate::SchedulerConfig;
use medgemma_model::memory::{self, MemoryPlan, PlanInput};
use medgemma_model::{DeviceSpec, Gemma3, KvCacheConfig, LoadOptions, ModelDType, Quantize};
use medgemma_rpc::worker::WatchdogOptions;
use medgemma_tokenizer::Tokenizer;

use crate::error::GeneratorError;

/// Flags of `medgemma-generator`.
#[derive(Debug, Clone, clap::Args)]
pub struct GeneratorArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(
        long,
        env = "MEDGEMMA_GENERATOR_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    pub listen: String,
    /// A Hugging Face checkpoint directory or a .gguf file (default: the demo GGUF in the cache,
    /// fetched by `medgemma fetch-demo`).
    #[arg(long, env = "MEDGEMMA_MODEL")]
    pub model: Option<PathBuf>,
    /// tokenizer.json or a directory holding it (default: the model directory's, or the GGUF's
    /// own vocabulary).
    #[arg(long, env = "MEDGEMMA_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// The model id reported in responses (default: the model's file or directory name).
    #[arg(long, env = "MEDGEMMA_MODEL_ID")]
    pub model_id: Option<String>,
    /// f32 or bf16 (default: f32 on cpu, bf16 on cuda). f16 is refused for Gemma 3.
    #[arg(long, env = "MEDGEMMA_DTYPE")]
    pub dtype: Option<ModelDType>,
    /// cpu, or cuda / cuda:N (needs a build with the `cuda` feature).
    #[arg(long, env = "MEDGEMMA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// On CUDA: the fraction of the GPU's memory this process may use. The weights (measured
    /// after load) and an activation reserve come off it; the rest holds the paged KV cache,
    /// whose size, longest context and batch are printed at start-up. `--kv-cache-bytes`, when
    /// set, wins.
    #[arg(long, env = "MEDGEMMA_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Quantize safetensors weights at load: q8_0 or q4k (cached as GGUF in --cache-dir).
    #[arg(long, env = "MEDGEMMA_QUANTIZE")]
    pub quantize: Option<Quantize>,
    /// Run a GGUF model's weights dequantized to f32.
    #[arg(long, env = "MEDGEMMA_DEQUANTIZE")]
    pub dequantize: bool,
    /// Take image embeddings from the demo's random vision tower (`medgemma-vision` without
    /// `--model`): declares that tower's image tokens on a decoder that has none of its own
    /// (the demo GGUF), as `medgemma up` does for its multimodal pool.
    #[arg(long, env = "MEDGEMMA_DEMO_VISION")]
    pub demo_vision: bool,
    /// Where quantized models are cached (default: $MEDGEMMA_CACHE_DIR/quantized).
    #[arg(long, env = "MEDGEMMA_QUANT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Requests that may wait beyond the running ones; one more gets RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "MEDGEMMA_QUEUE_CAPACITY", default_value_t = 16)]
    pub queue_capacity: usize,
    /// Sequences that run at once in the batch (continuous batching); more wait.
    #[arg(long, env = "MEDGEMMA_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Rows one forward step runs: a decode row per running sequence plus prefill chunks of
    /// long prompts (chunked prefill), so a long prompt never stalls the others.
    #[arg(long, env = "MEDGEMMA_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// The longest prompt accepted, in tokens (default: the model's context length).
    #[arg(long, env = "MEDGEMMA_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,
    /// Reuse the KV blocks of prompt prefixes seen before (`--prefix-caching false` turns it
    /// off).
    #[arg(long, env = "MEDGEMMA_PREFIX_CACHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
    /// Token budget of a request that sets no `max_new_tokens`.
    #[arg(long, env = "MEDGEMMA_DEFAULT_MAX_NEW_TOKENS", default_value_t = 512)]
    pub default_max_new_tokens: u32,
    /// Upper bound on KV-cache bytes (default: none).
    #[arg(long, env = "MEDGEMMA_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<usize>,
    /// Seconds in-flight calls may run after SIGTERM before their connections are closed.
    #[arg(long, env = "MEDGEMMA_DRAIN_TIMEOUT_S", default_value_t = DEFAULT_DRAIN_TIMEOUT_S)]
    pub drain_timeout_s: u64,
    /// The most new tokens a request may ask for (`sampling.max_new_tokens`); more is
    /// INVALID_ARGUMENT, whoever the caller.
    #[arg(long, env = "MEDGEMMA_MAX_NEW_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_new_tokens_limit: u32,
    /// The longest constraint (JSON schema or regex) a request may carry, in bytes; longer is
    /// INVALID_ARGUMENT.
    #[arg(long, env = "MEDGEMMA_MAX_CONSTRAINT_BYTES", default_value_t = 64 << 10)]
    pub max_constraint_bytes: usize,
    /// The model thread's health watchdog.
    #[command(flatten)]
    pub watchdog: medgemma_rpc::worker::WatchdogArgs,
    /// TLS, and mTLS with --tls-client-ca (production: only the gateway's certificate).
    #[command(flatten)]
    pub tls: medgemma_rpc::tls::ServerTlsArgs,
}

/// Default drain bound: above the longest generation the defaults allow (4096 new tokens at
/// ~40 tokens/s on a CPU).
pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 120;

/// What the service needs besides the model: see [`GeneratorArgs`] for the meaning of each.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Reported in every response.
    pub model_id: String,
    /// Bounded queue length.
    pub queue_capacity: usize,
    /// Token budget when a request sets none.
    pub default_max_new_tokens: u32,
    /// KV-cache settings (byte limit).
    pub kv_cache: KvCacheConfig,
    /// Batching: running sequences, rows per step, longest prompt.
    pub scheduler: SchedulerConfig,
    /// Drain bound at shutdown.
    pub drain_timeout: Duration,
    /// The most new tokens a request may ask for.
    pub max_new_tokens_limit: u32,
    /// The longest constraint (JSON schema or regex) a request may carry, in bytes.
    pub max_constraint_bytes: usize,
    /// How the model thread's health is judged.
    pub watchdog: WatchdogOptions,
    /// TLS of the listener (`None`: plaintext).
    pub tls: Option<medgemma_rpc::tls::ServerTls>,
    /// The plaintext health-only listener (`--health-listen`).
    pub health_listen: Option<String>,
}

impl GeneratorConfig {
    /// Defaults for a model id: queue of 16, 512-token budget, no KV limit, 64 running
    /// sequences, 512 rows per step, 120 s drain, at most 4096 new tokens and 64 KiB of
    /// constraint per request.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            model_id: model_id.into(),
            queue_capacity: 16,
            default_max_new_tokens: 512,
            kv_cache: KvCacheConfig::default(),
            scheduler: SchedulerConfig::default(),
            drain_timeout: Duration::from_secs(DEFAULT_DRAIN_TIMEOUT_S),
            max_new_tokens_limit: 4096,
            max_constraint_bytes: 64 << 10,
            watchdog: WatchdogOptions::default(),
            tls: None,
            health_listen: None,
        }
    }

    /// Checks the values (start-up validation).
    pub fn validate(&self) -> Result<(), GeneratorError> {
        if self.queue_capacity == 0 {
            return Err(GeneratorError::Config(
                "--queue-capacity must be at least 1".into(),
            ));
        }
        if self.default_max_new_tokens == 0 {
            return Err(GeneratorError::Config(
                "--default-max-new-tokens must be at least 1".into(),
            ));
        }
        if self.scheduler.max_running == 0 {
            return Err(GeneratorError::Config(
                "--max-running must be at least 1".into(),
            ));
        }
        if self.scheduler.max_batch_tokens == 0 {
            return Err(GeneratorError::Config(
                "--max-batch-tokens must be at least 1".into(),
            ));
        }
        if self.scheduler.max_input_tokens == Some(0) {
            return Err(GeneratorError::Config(
                "--max-input-tokens must be at least 1".into(),
            ));
        }
        if self.default_max_new_tokens > self.max_new_tokens_limit {
            return Err(GeneratorError::Config(format!(
                "--default-max-new-tokens ({}) is above --max-new-tokens-limit ({})",
                self.default_max_new_tokens, self.max_new_tokens_limit
            )));
        }
        if self.model_id.trim().is_empty() {
            return Err(GeneratorError::Config(
                "--model-id must not be empty".into(),
            ));
        }
        Ok(())
    }
}

/// The model id for a path: its file name without `.gguf`, or its directory name.
pub fn model_id_for(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_owned())
}

impl GeneratorArgs {
    /// The model path: `--model`, else the demo GGUF.
    pub fn model_path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(|| medgemma_assets::demo_paths().gguf)
    }

    /// The service configuration these flags describe.
    pub fn config(&self) -> GeneratorConfig {
        GeneratorConfig {
            model_id: self
                .model_id
                .clone()
                .unwrap_or_else(|| model_id_for(&self.model_path())),
            queue_capacity: self.queue_capacity,
            default_max_new_tokens: self.default_max_new_tokens,
            kv_cache: KvCacheConfig {
                max_bytes: self.kv_cache_bytes,
                ..KvCacheConfig::default()
            },
            scheduler: SchedulerConfig {
                max_running: self.max_running,
                max_batch_tokens: self.max_batch_tokens,
                max_input_tokens: self.max_input_tokens,
                prefix_caching: self.prefix_caching,
            },
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            max_new_tokens_limit: self.max_new_tokens_limit,
            max_constraint_bytes: self.max_constraint_bytes,
            watchdog: self.watchdog.options(),
            tls: None,
            health_listen: None,
        }
    }

    /// The dtype to load in: `--dtype`, else the device's default.
    pub fn dtype(&self) -> Result<ModelDType, GeneratorError> {
        let spec: DeviceSpec = self.device.parse().map_err(device_error)?;
        Ok(self.dtype.unwrap_or(spec.default_dtype()))
    }

    /// Checks the flags that need no model (start-up validation).
    pub fn validate(&self) -> Result<(), GeneratorError> {
        self.device.parse::<DeviceSpec>().map_err(device_error)?;
        let u = self.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(GeneratorError::Config(format!(
                "--gpu-memory-utilization {u}: expected a fraction in (0, 1]"
            )));
        }
        Ok(())
    }

    /// On CUDA, the memory plan for a loaded model (see `medgemma_model::memory`) and the KV
    /// cache configuration it gives; `None` on the CPU (the cache grows on demand there).
    pub fn memory_plan(
        &self,
        model: &Gemma3,
    ) -> Result<Option<(MemoryPlan, KvCacheConfig)>, GeneratorError> {
        let Some((total, free)) =
            medgemma_model::device::memory_info(model.device()).map_err(GeneratorError::Load)?
        else {
            return Ok(None);
        };
        let base = self.config().kv_cache;
        let input = PlanInput::for_model(
            &model.config().text,
            total,
            total.saturating_sub(free),
            model.info().weight_bytes,
            self.gpu_memory_utilization,
            model.dtype().size_in_bytes(),
            base.block_size,
            self.max_running,
            self.max_batch_tokens,
        );
        plan_kv(&input, base).map(Some)
    }

    /// Loads the model and tokenizer (blocking: run it off the async runtime).
    pub fn load(&self) -> Result<(Gemma3, Tokenizer), GeneratorError> {
        let path = self.model_path();
        let tokenizer = load_tokenizer(&path, self.tokenizer.as_deref())?;
        let options = LoadOptions {
            dtype: self.dtype()?,
            device: device(&self.device)?,
            quantize: self.quantize,
            dequantize: self.dequantize,
            cache_dir: Some(self.cache_dir.clone().unwrap_or_else(|| {
                medgemma_assets::quantization_cache_dir(&medgemma_assets::cache_dir())
            })),
            progress: None,
        };
        let mut model = Gemma3::load(&path, &options).map_err(GeneratorError::Load)?;
        if self.demo_vision {
            let vision = medgemma_vision::VisionModelConfig::demo(model.config().text.hidden_size)
                .map_err(|e| GeneratorError::Config(format!("--demo-vision: {e}")))?;
            model
                .set_multimodal(vision.to_model_config())
                .map_err(GeneratorError::Load)?;
        }
        Ok((model, tokenizer))
    }
}

/// `cpu`, `cuda` or `cuda:N`: a clear error (never a panic) when the device is not there.
pub fn device(spec: &str) -> Result<candle_core::Device, GeneratorError> {
    DeviceSpec::open_str(spec).map_err(device_error)
}

fn device_error(e: medgemma_model::ModelError) -> GeneratorError {
    GeneratorError::Config(format!("--device: {e}"))
}

/// The KV cache a plan gives: its pools and byte limit, unless `--kv-cache-bytes` set a
/// limit (then the pools are split from that).
pub fn plan_kv(
    input: &PlanInput,
    base: KvCacheConfig,
) -> Result<(MemoryPlan, KvCacheConfig), GeneratorError> {
    let plan = memory::plan(input).map_err(|e| GeneratorError::Config(e.to_string()))?;
    let kv = match base.max_bytes {
        Some(limit) => KvCacheConfig {
            paged_blocks: Some(memory::split_blocks(limit, input)),
            ..base
        },
        None => KvCacheConfig {
            max_bytes: Some(plan.kv_bytes),
            paged_blocks: Some(plan.blocks),
            ..base
        },
    };
    Ok((plan, kv))
}

/// The tokenizer as `medgemma generate` finds it: the explicit path, else the model
/// directory's, else the GGUF's own vocabulary.
pub fn load_tokenizer(model: &Path, explicit: Option<&Path>) -> Result<Tokenizer, GeneratorError> {
    if let Some(p) = explicit {
        return Tokenizer::from_path(p).map_err(GeneratorError::Tokenizer);
    }
    if model.is_dir() {
        return Tokenizer::from_path(model).map_err(GeneratorError::Tokenizer);
    }
    Tokenizer::from_gguf_file(model).map_err(GeneratorError::Tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        a: GeneratorArgs,
    }

    fn args(flags: &[&str]) -> GeneratorArgs {
        Cli::try_parse_from(std::iter::once("medgemma-generator").chain(flags.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn dtype_follows_the_device_unless_given() {
        assert_eq!(args(&[]).dtype().unwrap(), ModelDType::F32);
        assert_eq!(
            args(&["--device", "cuda:1"]).dtype().unwrap(),
            ModelDType::BF16
        );
        let a = args(&["--device", "cuda", "--dtype", "f32"]);
        assert_eq!(a.dtype().unwrap(), ModelDType::F32);
        assert_eq!(a.gpu_memory_utilization, 0.9);
    }

    #[test]
    fn bad_device_and_utilization_are_start_up_errors() {
        for (flags, want) in [
            (&["--device", "tpu"][..], "--device"),
            (&["--gpu-memory-utilization", "0"][..], "(0, 1]"),
            (&["--gpu-memory-utilization", "1.5"][..], "(0, 1]"),
        ] {
            let e = args(flags).validate().unwrap_err().to_string();
            assert!(e.contains(want), "{flags:?}: {e}");
        }
        args(&["--device", "cuda:0", "--gpu-memory-utilization", "1"])
            .validate()
            .unwrap();
        // Opening CUDA where there is none: a configuration error, not a panic.
        if !medgemma_model::device::CUDA_BUILD {
            let e = device("cuda").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }

    #[test]
    fn the_plan_sizes_the_pools_and_kv_cache_bytes_wins() {
        let path = medgemma_test_support::fixture("configs/medgemma-4b-it.json");
        let v = medgemma_test_support::read_json(&path);
        let t = medgemma_model::ModelConfig::from_hf_json(&v, &path)
            .unwrap()
            .text;
        let gib = 1usize << 30;
        let input = PlanInput::for_model(&t, 80 * gib, 9 * gib, 8 * gib, 0.9, 2, 16, 64, 512);
        let (plan, kv) = plan_kv(&input, KvCacheConfig::default()).unwrap();
        assert_eq!(kv.max_bytes, Some(plan.kv_bytes));
        assert_eq!(kv.paged_blocks, Some(plan.blocks));
        let limit = KvCacheConfig {
            max_bytes: Some(2 * gib),
            ..KvCacheConfig::default()
        };
        let (_, kv) = plan_kv(&input, limit).unwrap();
        assert_eq!(kv.max_bytes, Some(2 * gib));
        let [s, g] = kv.paged_blocks.unwrap();
        assert!(s * input.block_bytes[0] + g * input.block_bytes[1] <= 2 * gib);
        // No room: the error names the flag.
        let full = PlanInput::for_model(&t, 16 * gib, 15 * gib, 14 * gib, 0.9, 2, 16, 64, 512);
        let e = plan_kv(&full, KvCacheConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--gpu-memory-utilization"), "{e}");
    }
}
