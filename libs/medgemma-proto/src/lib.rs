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

pub use medgemma_media::{IMAGE_MEDIA_TYPES, ImageFormat, image_format, image_media_type};

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
