//! The vision service's one error type and its one mapping to `tonic::Status`.

use std::sync::Arc;

use medgemma_rpc::FieldViolation;
use medgemma_vision::VisionError;
use tonic::Status;

/// What can fail while starting the service or encoding an image. Messages name fields,
/// formats and limits, never pixel values or DICOM attribute values.
#[derive(Debug, thiserror::Error)]
pub enum VisionServiceError {
    /// A flag is out of range, or the model cannot be loaded.
    #[error("configuration: {0}")]
    Config(String),
    /// Binding or serving failed.
    #[error(transparent)]
    Rpc(#[from] medgemma_rpc::RpcError),
    /// The request is malformed.
    #[error("invalid request ({} field violations)", .0.len())]
    InvalidArgument(Vec<FieldViolation>),
    /// An image could not be read: not decodable, over a limit, unsupported.
    #[error("images[{index}]: {source}")]
    BadImage {
        /// Which image of the request.
        index: usize,
        /// Why (shared: an identical image in the same batch fails alike).
        source: Arc<VisionError>,
    },
    /// The encoder failed on a valid image.
    #[error("encoding images[{index}] failed: {source}")]
    Encode {
        /// Which image of the request.
        index: usize,
        /// Why (shared by every image of the failed batch).
        source: Arc<VisionError>,
    },
    /// The queue is full.
    #[error("the vision encoder is busy: {capacity} requests already wait; retry later")]
    Overloaded {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The request's deadline passed before its images were encoded.
    #[error("deadline exceeded before the images were encoded")]
    DeadlineExceeded,
    /// The encoder failed (panicked) on the batch holding this request; it goes on serving.
    #[error("the vision encoder failed on this request")]
    Crashed,
    /// The encoder thread is gone (shutting down).
    #[error("the vision encoder is not running")]
    WorkerGone,
}

/// Whether a vision error is about the input (the caller's fault) rather than the encoder.
pub fn is_input_error(e: &VisionError) -> bool {
    match e {
        VisionError::Empty
        | VisionError::EncodedTooLarge { .. }
        | VisionError::UnknownFormat
        | VisionError::ZeroDimension { .. }
        | VisionError::TooManyPixels { .. }
        | VisionError::Corrupt { .. }
        | VisionError::UnsupportedTransferSyntax { .. }
        | VisionError::MissingPixelData
        | VisionError::DicomAttribute { .. }
        | VisionError::DicomTooComplex { .. }
        | VisionError::Unsupported { .. }
        | VisionError::FrameOutOfRange { .. }
        | VisionError::InvalidArgument(_) => true,
        VisionError::Config(_) | VisionError::Checkpoint(_) | VisionError::Candle(_) => false,
    }
}

impl From<VisionServiceError> for Status {
    fn from(e: VisionServiceError) -> Self {
        let message = e.to_string();
        match e {
            VisionServiceError::InvalidArgument(v) => medgemma_rpc::bad_request_violations(v),
            VisionServiceError::BadImage { index, source } => {
                let field = match *source {
                    VisionError::FrameOutOfRange { .. } => format!("images[{index}].dicom_frame"),
                    _ => format!("images[{index}].data"),
                };
                medgemma_rpc::bad_request(field, source.to_string())
            }
            // Nothing was started: the RetryInfo lets a gateway try another replica at once.
            VisionServiceError::Overloaded { .. } => {
                medgemma_rpc::overloaded(message, std::time::Duration::from_millis(500))
            }
            VisionServiceError::DeadlineExceeded => Status::deadline_exceeded(message),
            VisionServiceError::WorkerGone => Status::unavailable(message),
            VisionServiceError::Crashed
            | VisionServiceError::Config(_)
            | VisionServiceError::Rpc(_)
            | VisionServiceError::Encode { .. } => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_an_overload_a_gateway_may_retry_elsewhere() {
        let s: Status = VisionServiceError::Overloaded { capacity: 4 }.into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(medgemma_rpc::is_overloaded(&s));
        assert!(s.message().contains("4 requests already wait"));
        let s: Status = VisionServiceError::DeadlineExceeded.into();
        assert!(!medgemma_rpc::is_overloaded(&s));
    }
}
