//! The service's error type and its one mapping to gRPC status codes.

use medgemma_engine::EngineError;
use medgemma_engine::constraint::ConstraintError;
use medgemma_engine::sampling::SamplingError;
use medgemma_model::ModelError;
use medgemma_tokenizer::TokenizerError;
use tonic::Status;

/// What can fail while starting or serving the generator. Messages never carry prompt content.
#[derive(Debug, thiserror::Error)]
pub enum GeneratorError {
    /// Loading the model failed.
    #[error("loading the model: {0}")]
    Load(#[source] ModelError),
    /// Loading the tokenizer failed.
    #[error("loading the tokenizer: {0}")]
    Tokenizer(#[source] TokenizerError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding or serving failed.
    #[error(transparent)]
    Rpc(#[from] medgemma_rpc::RpcError),
    /// Generation failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The model thread is gone (it panicked or the service is shutting down).
    #[error("the model worker has stopped")]
    WorkerGone,
    /// The warm-up generation failed.
    #[error("warm-up failed: {0}")]
    Warmup(#[source] EngineError),
}

fn sampling_status(e: &SamplingError) -> Status {
    match e {
        SamplingError::InvalidParam { name, reason } => {
            medgemma_rpc::bad_request(format!("sampling.{name}"), reason.clone())
        }
        SamplingError::EmptyLogits
        | SamplingError::LogitsTooLarge(_)
        | SamplingError::NonFiniteLogit { .. }
        | SamplingError::MaskSizeMismatch { .. } => Status::internal(format!("sampling: {e}")),
        SamplingError::NoAllowedTokens => Status::failed_precondition(format!(
            "sampling: {e} (the constraint admits no token the model can produce)"
        )),
    }
}

fn constraint_status(e: &ConstraintError) -> Status {
    match e {
        ConstraintError::InvalidSpec(reason) => {
            medgemma_rpc::bad_request("constraint", reason.clone())
        }
        ConstraintError::UnsupportedTokenizer(_)
        | ConstraintError::InvalidConfig(_)
        | ConstraintError::TokenRejected { .. }
        | ConstraintError::Matcher(_) => Status::internal(format!("constrained decoding: {e}")),
    }
}

fn model_status(e: &ModelError) -> Status {
    match e {
        // At run time the limits left are the KV-cache byte budget (the context is checked
        // before admission).
        ModelError::Limit(reason) => Status::resource_exhausted(reason.clone()),
        ModelError::InvalidInput(reason) => Status::invalid_argument(reason.clone()),
        ModelError::Io { .. }
        | ModelError::Config { .. }
        | ModelError::UnsupportedArchitecture { .. }
        | ModelError::MissingTensor { .. }
        | ModelError::TensorShape { .. }
        | ModelError::Checkpoint { .. }
        | ModelError::Dtype(_)
        | ModelError::Device(_)
        | ModelError::Candle(_) => Status::internal(format!("model: {e}")),
    }
}

/// The one mapping of engine errors to gRPC status codes (exhaustive, no wildcard arms). A
/// function rather than `From`: both types are foreign here; [`GeneratorError`] carries it.
pub(crate) fn engine_status(e: &EngineError) -> Status {
    match e {
        EngineError::Model(m) => model_status(m),
        EngineError::Tokenizer(t) => Status::internal(format!("tokenizer: {t}")),
        EngineError::Sampling(s) => sampling_status(s),
        EngineError::Constraint(c) => constraint_status(c),
        EngineError::ContextExceeded { .. } => {
            medgemma_rpc::bad_request("prompt_ids", e.to_string())
        }
        EngineError::InputTooLong { .. } | EngineError::KvCapacity { .. } => {
            medgemma_rpc::bad_request("prompt_ids", e.to_string())
        }
        EngineError::InvalidRequest(reason) => Status::invalid_argument(reason.clone()),
        EngineError::Internal(reason) => Status::internal(reason.clone()),
    }
}
