//! The one error type of the vision crate.

/// Everything that can go wrong decoding or preprocessing an image.
///
/// Messages name the format, the limit or the DICOM attribute involved; they never carry pixel
/// values or DICOM attribute values that could identify a patient.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The input is empty.
    #[error("the image is empty (0 bytes)")]
    Empty,
    /// The encoded input is larger than [`crate::DecodeOptions::max_encoded_bytes`].
    #[error("the encoded image is {len} bytes, over the limit of {limit} bytes")]
    EncodedTooLarge { len: usize, limit: usize },
    /// The magic bytes match none of the formats we read.
    #[error(
        "unrecognised image format (expected PNG, JPEG, WebP, TIFF, or DICOM with the \
         \"DICM\" prefix at offset 128)"
    )]
    UnknownFormat,
    /// The image claims a width or height of zero.
    #[error("the {format} image has a zero dimension ({width}x{height})")]
    ZeroDimension {
        format: &'static str,
        width: u64,
        height: u64,
    },
    /// The decoded image would hold more pixels than [`crate::DecodeOptions::max_pixels`]
    /// (decompression-bomb guard).
    #[error(
        "the {format} image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels"
    )]
    TooManyPixels {
        format: &'static str,
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },
    /// The file is truncated or corrupt; `detail` says where decoding stopped.
    #[error("corrupt or truncated {format} image: {detail}")]
    Corrupt {
        format: &'static str,
        detail: String,
    },
    /// The DICOM transfer syntax is unknown or its pixel data cannot be decoded by this build.
    #[error("unsupported DICOM transfer syntax {uid} ({name})")]
    UnsupportedTransferSyntax { uid: String, name: String },
    /// The DICOM object has no Pixel Data (7FE0,0010) element.
    #[error("the DICOM object has no pixel data (7FE0,0010); it is not an image")]
    MissingPixelData,
    /// A required DICOM image attribute is missing or holds a value we cannot use.
    #[error("DICOM attribute {attribute}: {problem}")]
    DicomAttribute {
        attribute: &'static str,
        problem: String,
    },
    /// A valid image whose kind we do not support (a photometric interpretation, bit depth,
    /// ...).
    #[error("unsupported {format} image: {detail}")]
    Unsupported {
        format: &'static str,
        detail: String,
    },
    /// The DICOM element structure is over a limit ([`crate::DecodeOptions::max_dicom_depth`]
    /// or [`crate::DecodeOptions::max_dicom_elements`]), checked before dicom-rs parses it.
    #[error("the DICOM object's {what} is over the limit of {limit} ({option})")]
    DicomTooComplex {
        /// `"sequence nesting depth"` or `"element count"`.
        what: &'static str,
        limit: u64,
        /// The option (and service flag) that sets the limit.
        option: &'static str,
    },
    /// The requested frame does not exist.
    #[error("frame {frame} requested but the image has {frames} frame(s) (frames count from 0)")]
    FrameOutOfRange { frame: u32, frames: u32 },
    /// A caller-supplied argument is invalid (e.g. a target size of zero).
    #[error("{0}")]
    InvalidArgument(String),
    /// A config.json that does not describe a usable vision tower.
    #[error("vision config: {0}")]
    Config(String),
    /// The checkpoint lacks a tensor or holds a bad one.
    #[error("vision checkpoint: {0}")]
    Checkpoint(String),
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl VisionError {
    pub(crate) fn corrupt(format: &'static str, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            format,
            detail: detail.into(),
        }
    }

    pub(crate) fn attribute(attribute: &'static str, problem: impl Into<String>) -> Self {
        Self::DicomAttribute {
            attribute,
            problem: problem.into(),
        }
    }

    pub(crate) fn unsupported(format: &'static str, detail: impl Into<String>) -> Self {
        Self::Unsupported {
            format,
            detail: detail.into(),
        }
    }
}

/// Result alias of the vision crate.
pub type Result<T> = std::result::Result<T, VisionError>;
