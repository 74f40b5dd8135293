//! Any bytes as a DICOM data set (the preamble and "DICM" prefix added): the pre-parse walk,
//! dicom-rs and our display pipeline return an image or an error, never a panic or a stack
//! overflow.

use medgemma_vision::{DecodeOptions, decode_image};

pub fn run(data: &[u8]) {
    let mut file = vec![0u8; 128];
    file.extend_from_slice(b"DICM");
    file.extend_from_slice(data);
    let opts = DecodeOptions {
        max_encoded_bytes: 1 << 20,
        max_pixels: 4_000_000,
        ..DecodeOptions::default()
    };
    let _ = decode_image(&file, &opts);
}
