//! Any bytes through the image decoders (PNG, JPEG, WebP, TIFF, DICOM): an image or an error,
//! never a panic, a hang or an allocation past the limits.

use medgemma_vision::{DecodeOptions, decode_image};

pub fn run(data: &[u8]) {
    let opts = DecodeOptions {
        max_encoded_bytes: 1 << 20,
        max_pixels: 4_000_000,
        ..DecodeOptions::default()
    };
    if let Ok(img) = decode_image(data, &opts) {
        assert!(u64::from(img.width()) * u64::from(img.height()) <= opts.max_pixels);
    }
}
