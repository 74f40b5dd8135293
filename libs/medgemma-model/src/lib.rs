//! The Gemma 3 decoder of medgemma-serve, on candle.
//!
//! Loads MedGemma 27B text and the decoder of MedGemma 4B from Hugging Face safetensors (every
//! checkpoint layout, sharded, memory-mapped) or GGUF, in f32 or bf16, or quantized (GGUF's
//! own types, or Q8_0 / Q4_K made at load and cached as GGUF). Computes what transformers
//! computes: see `shared/design.md` §2 for the numerics this crate must hold, and the parity
//! tests against committed goldens.
//!
//! The model is immutable; per-sequence state is a [`SequenceKv`] in a paged [`KvCache`].
//! This crate knows nothing of tokenizers, sampling or gRPC.

mod config;
mod cpu_attention;
mod cpu_gemv;
mod cpu_layout;
pub mod cpu_ops;
pub mod device;
mod error;
mod kv_cache;
mod layers;
pub mod memory;
mod model;
pub mod paged;
#[cfg(feature = "cuda")]
mod paged_cuda;
mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use config::{LayerType, ModelConfig, MultimodalConfig, RopeParams, TextConfig};
pub use device::DeviceSpec;
pub use error::{ModelError, Result};
pub use kv_cache::{
    CpuRows, DEFAULT_BLOCK_SIZE, DEFAULT_PAGED_KV_BYTES, KvCache, KvCacheConfig, SequenceKv,
};
pub use model::{Gemma3, LoadInfo, LoadOptions, LogitsRows, ModelDType, ProgressFn, SeqInput};
pub use weights::{HfLayout, Quantize, SafetensorsCheckpoint};
