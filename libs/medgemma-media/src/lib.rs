//! Image media types and formats of the gRPC contract's `Image` message, with no
//! dependencies: the gateway and the vision service check `mime_type` and sniff the bytes with
//! these, and the vision crate (a model crate, free of tonic) decodes by the same sniffing.

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
    use super::*;

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
}
