//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a Gemma 3 model.
///
/// Messages name the file, tensor or limit involved and never carry prompt content.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file is not valid JSON or misses a required key.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The checkpoint is for a model family we do not serve.
    #[error("unsupported architecture {found:?} in {path} (expected Gemma 3)")]
    UnsupportedArchitecture { path: PathBuf, found: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name} is missing from {path}")]
    MissingTensor { name: String, path: PathBuf },
    /// A tensor exists but has the wrong shape.
    #[error("tensor {name} in {path} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        path: PathBuf,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A checkpoint file is truncated, corrupt, or of a type we cannot read.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A dtype that Gemma 3 cannot run in, or that this build does not support.
    #[error("{0}")]
    Dtype(String),
    /// A request exceeds a limit of the model (context length, vocabulary, batch shape).
    #[error("{0}")]
    Limit(String),
    /// The caller passed inconsistent inputs (e.g. image embeddings that do not match the
    /// number of image tokens).
    #[error("{0}")]
    InvalidInput(String),
    /// The device asked for cannot be used (no CUDA in this build, no driver, no such GPU).
    #[error("{0}")]
    Device(String),
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
