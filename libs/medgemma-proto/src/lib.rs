//! The medgemma-serve gRPC contract, generated from `proto/medgemma/**/*.proto`.
//!
//! One module per versioned package — [`tokenizer::v1`], [`vision::v1`], [`generation::v1`],
//! [`gateway::v1`] — each holding the messages, a `*_client` and a `*_server` module.
//! [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set of all four (with comments) for server
//! reflection.
//!
//! Proto types stop at the service edge: the model and engine crates never see them.

#![allow(
    missing_docs,
    clippy::doc_lazy_continuation,
    clippy::large_enum_variant
)]

/// `medgemma.tokenizer.v1`: chat template, encode, decode, token counts, image-token layout.
pub mod tokenizer {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("medgemma.tokenizer.v1");
    }
}

/// `medgemma.vision.v1`: images to soft-token embeddings.
pub mod vision {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("medgemma.vision.v1");
    }
}

/// `medgemma.generation.v1`: token ids (and image embeddings) to generated tokens.
pub mod generation {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("medgemma.generation.v1");
    }
}

/// `medgemma.gateway.v1`: the typed clinical task API.
pub mod gateway {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("medgemma.gateway.v1");
    }
}

/// The encoded `FileDescriptorSet` of every medgemma proto, for
/// `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/medgemma_descriptor.bin"));

/// The fully qualified names of the four services, as reflection lists them.
pub const SERVICE_NAMES: &[&str] = &[
    "medgemma.tokenizer.v1.Tokenizer",
    "medgemma.vision.v1.VisionEncoder",
    "medgemma.generation.v1.Generator",
    "medgemma.gateway.v1.ClinicalTasks",
];

/// The media types an `Image.mime_type` (vision and gateway protos) may name.
pub const IMAGE_MEDIA_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/webp",
    "image/tiff",
    "application/dicom",
];

/// Checks an `Image.mime_type`: its essence, lower case and without parameters (`""`: sniff
/// the format from the bytes), or what is wrong with it (for a field violation).
pub fn image_media_type(mime_type: &str) -> Result<String, String> {
    let mime = mime_type.trim().to_ascii_lowercase();
    let essence = mime.split(';').next().unwrap_or_default().trim();
    if essence.is_empty() || IMAGE_MEDIA_TYPES.contains(&essence) {
        Ok(essence.to_owned())
    } else {
        Err(format!(
            "must be empty or one of {}",
            IMAGE_MEDIA_TYPES.join(", ")
        ))
    }
}

/// The image container formats the vision service reads (`medgemma_vision::decode_image`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Png,
    Jpeg,
    WebP,
    Tiff,
    /// A DICOM Part 10 file (128-byte preamble, then "DICM").
    Dicom,
}

impl ImageFormat {
    /// A short name for messages and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::WebP => "WebP",
            Self::Tiff => "TIFF",
            Self::Dicom => "DICOM",
        }
    }
}

/// The format of `bytes`, from its magic bytes; `None` if it is none we read.
pub fn image_format(bytes: &[u8]) -> Option<ImageFormat> {
    // DICOM first: a DICOM preamble may itself be a TIFF header (dual-format files).
    if bytes.get(128..132) == Some(b"DICM".as_slice()) {
        Some(ImageFormat::Dicom)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::WebP)
    } else if bytes.starts_with(b"II*\0")
        || bytes.starts_with(b"MM\0*")
        || bytes.starts_with(b"II+\0")
        || bytes.starts_with(b"MM\0+")
    {
        Some(ImageFormat::Tiff)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn descriptor_set_holds_every_service_with_comments() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let mut services = Vec::new();
        for file in &fds.file {
            for service in &file.service {
                services.push(format!("{}.{}", file.package(), service.name()));
            }
            let info = file.source_code_info.as_ref().expect("source info kept");
            assert!(
                info.location
                    .iter()
                    .any(|l| !l.leading_comments().trim().is_empty()),
                "{} lost its comments",
                file.name()
            );
        }
        services.sort();
        let mut want: Vec<String> = SERVICE_NAMES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(services, want);
    }

    #[test]
    fn formats_by_magic() {
        assert_eq!(image_format(b"\x89PNG\r\n\x1a\nxx"), Some(ImageFormat::Png));
        assert_eq!(
            image_format(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(
            image_format(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(ImageFormat::WebP)
        );
        assert_eq!(image_format(b"II*\0\x08\0\0\0"), Some(ImageFormat::Tiff));
        assert_eq!(image_format(b"MM\0*\0\0\0\x08"), Some(ImageFormat::Tiff));
        let mut dicom = vec![0u8; 132];
        dicom[128..].copy_from_slice(b"DICM");
        assert_eq!(image_format(&dicom), Some(ImageFormat::Dicom));
        assert_eq!(image_format(b"GIF89a"), None);
        assert_eq!(image_format(b""), None);
    }

    #[test]
    fn image_media_types_are_checked_by_their_essence() {
        assert_eq!(image_media_type("").unwrap(), "");
        assert_eq!(image_media_type(" Image/PNG ").unwrap(), "image/png");
        assert_eq!(
            image_media_type("application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90").unwrap(),
            "application/dicom"
        );
        let e = image_media_type("text/plain").unwrap_err();
        assert!(e.starts_with("must be empty or one of image/png"), "{e}");
    }

    #[test]
    fn service_name_constants_match_generated_code() {
        use tonic::server::NamedService;
        assert_eq!(
            <tokenizer::v1::tokenizer_server::TokenizerServer<()> as NamedService>::NAME,
            SERVICE_NAMES[0]
        );
    }

    #[test]
    fn optional_sampling_fields_distinguish_unset_from_zero() {
        let unset = generation::v1::SamplingParams::default();
        assert_eq!(unset.temperature, None);
        let zero = generation::v1::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        };
        let round =
            generation::v1::SamplingParams::decode(zero.encode_to_vec().as_slice()).unwrap();
        assert_eq!(round.temperature, Some(0.0));
    }
}
