//! Image input of medgemma-serve: encoded bytes -> 8-bit RGB -> Gemma 3 pixel values.
//!
//! - [`mod@decode`]: PNG, JPEG (EXIF orientation applied), WebP, TIFF and DICOM (dicom-rs:
//!   uncompressed, RLE, JPEG baseline / lossless, JPEG 2000; 1 to 16 bits and 32) to
//!   [`RgbImage`], with limits on encoded bytes and decoded pixels checked before decoding.
//!   DICOM goes through our own modality LUT -> VOI -> MONOCHROME1 pipeline, tested against
//!   pydicom.
//! - [`mod@preprocess`]: Pillow's BILINEAR resize reproduced bit for bit, the rescale and
//!   normalisation of transformers' `Gemma3ImageProcessor` (PIL backend), and its
//!   pan-and-scan crops. See `shared/design.md` §2 for the image path.
//!
//! - [`mod@siglip`] + [`mod@encoder`]: the SigLIP tower and Gemma 3 projector, and
//!   [`VisionEncoder`] (bytes -> soft-token embeddings), equal to transformers within 1e-4.
//!   On AVX-512 CPUs the tower's attention is one fused kernel (`attention.rs`).
//!
//! Nothing here logs or returns pixel values or DICOM attribute values; errors name the
//! format, the attribute or the limit.

mod attention;
pub mod decode;
pub mod dicom;
mod dicom_walk;
pub mod encoder;
mod error;
pub mod hostile;
pub mod preprocess;
pub mod siglip;

pub use decode::{DecodeOptions, decode_image};
pub use encoder::{VisionEncoder, VisionModelConfig};
pub use error::{Result, VisionError};
pub use image::RgbImage;
pub use preprocess::{
    CropBox, PanAndScanConfig, PreprocessConfig, pan_and_scan, pan_and_scan_boxes, preprocess,
    resize_bilinear_pil, to_pixel_values,
};
pub use siglip::{Projector, SiglipConfig, SiglipTower};
