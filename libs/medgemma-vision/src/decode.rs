//! Image bytes -> 8-bit RGB, for every format a client may send.
//!
//! The format is found from the magic bytes (never from a file name or a client's MIME type):
//! PNG, JPEG, WebP and TIFF go through the `image` crate with the EXIF orientation applied (as
//! transformers' `load_image` does with `ImageOps.exif_transpose`); DICOM (the "DICM" prefix at
//! offset 128) goes through dicom-rs and our own 8-bit display pipeline (see [`crate::dicom`]).
//!
//! Every path checks the limits of [`DecodeOptions`] before it allocates the decoded image,
//! and any failure is a [`VisionError`] naming the format and the problem: a file that
//! decodes is the whole image, never a partial one.

use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

// The format sniffing is the contract's (the gateway checks uploads with the same function).
use medgemma_media::{ImageFormat as SourceFormat, image_format};

use crate::error::{Result, VisionError};

/// Limits and choices for [`decode_image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Largest encoded input accepted, in bytes.
    pub max_encoded_bytes: usize,
    /// Largest decoded image accepted, in pixels (width x height): the decompression-bomb
    /// guard, checked from the header before the pixels are decoded.
    pub max_pixels: u64,
    /// Which frame of a multi-frame DICOM to decode, counting from 0. Other formats have one
    /// frame (the first page of a TIFF, the first frame of an animated WebP): asking them for
    /// another is an error.
    pub frame: u32,
    /// Deepest nesting of DICOM sequences accepted, checked before dicom-rs parses the
    /// object (it reads nested sequences recursively: 10,000 levels overflow a thread's stack).
    pub max_dicom_depth: u32,
    /// Most DICOM elements accepted (items and delimiters included), checked before parsing.
    pub max_dicom_elements: u64,
}

/// Default for [`DecodeOptions::max_encoded_bytes`]: 64 MiB.
pub const DEFAULT_MAX_ENCODED_BYTES: usize = 64 << 20;
/// Default for [`DecodeOptions::max_pixels`]: 100 megapixels (a 10 000 x 10 000 image).
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;
/// Default for [`DecodeOptions::max_dicom_depth`]: real images nest a handful of levels
/// (functional groups, code sequences); structured reports a few more.
pub const DEFAULT_MAX_DICOM_DEPTH: u32 = 32;
/// Default for [`DecodeOptions::max_dicom_elements`]: an enhanced multi-frame object with
/// per-frame functional groups for a thousand frames holds ~50,000.
pub const DEFAULT_MAX_DICOM_ELEMENTS: u64 = 200_000;

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_encoded_bytes: DEFAULT_MAX_ENCODED_BYTES,
            max_pixels: DEFAULT_MAX_PIXELS,
            frame: 0,
            max_dicom_depth: DEFAULT_MAX_DICOM_DEPTH,
            max_dicom_elements: DEFAULT_MAX_DICOM_ELEMENTS,
        }
    }
}

/// Decodes an encoded image to 8-bit RGB.
///
/// Grayscale becomes RGB by repeating the channel; alpha is dropped (as PIL's
/// `convert("RGB")` does); 16-bit samples are scaled to 8 bits. JPEG, PNG, WebP and TIFF
/// have their EXIF orientation applied. DICOM goes through the modality LUT, the VOI
/// window or LUT (min-max when there is none) and MONOCHROME1 inversion; see
/// [`crate::dicom`].
pub fn decode_image(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(VisionError::Empty);
    }
    if bytes.len() > opts.max_encoded_bytes {
        return Err(VisionError::EncodedTooLarge {
            len: bytes.len(),
            limit: opts.max_encoded_bytes,
        });
    }
    let format = image_format(bytes).ok_or(VisionError::UnknownFormat)?;
    let image = match format {
        SourceFormat::Dicom => guarded(format, || crate::dicom::decode_dicom(bytes, opts))?,
        SourceFormat::Png | SourceFormat::Jpeg | SourceFormat::WebP | SourceFormat::Tiff => {
            if opts.frame != 0 {
                return Err(VisionError::FrameOutOfRange {
                    frame: opts.frame,
                    frames: 1,
                });
            }
            guarded(format, || decode_raster(bytes, format, opts))?
        }
    };
    tracing::debug!(
        format = format.name(),
        width = image.width(),
        height = image.height(),
        "image decoded"
    );
    Ok(image)
}

/// Runs a third-party decoder so that a bug in it on malformed input becomes an error, not a
/// crash of the serving process.
fn guarded<T>(format: SourceFormat, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                format = format.name(),
                "image decoder panicked; input rejected"
            );
            Err(VisionError::corrupt(
                format.name(),
                "the decoder failed on malformed data",
            ))
        }
    }
}

/// Checks a header's dimensions against zero and [`DecodeOptions::max_pixels`].
pub(crate) fn check_dimensions(
    format: &'static str,
    width: u64,
    height: u64,
    max_pixels: u64,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(VisionError::ZeroDimension {
            format,
            width,
            height,
        });
    }
    let pixels = width.saturating_mul(height);
    if pixels > max_pixels {
        return Err(VisionError::TooManyPixels {
            format,
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    Ok(())
}

fn decode_raster(bytes: &[u8], format: SourceFormat, opts: &DecodeOptions) -> Result<RgbImage> {
    let name = format.name();
    let image_format = match format {
        SourceFormat::Png => {
            // The png crate rejects a zero size with a generic error: read IHDR first.
            if let Some((width, height)) = png_size(bytes) {
                check_dimensions(name, width.into(), height.into(), opts.max_pixels)?;
            }
            ImageFormat::Png
        }
        SourceFormat::Jpeg => {
            // zune-jpeg fills a truncated scan with grey and reports success: check that the
            // marker structure is complete (up to EOI) before decoding.
            let info = scan_jpeg(bytes).map_err(|detail| VisionError::corrupt(name, detail))?;
            if let Some((width, height)) = info.size {
                check_dimensions(name, width.into(), height.into(), opts.max_pixels)?;
            }
            if !info.complete {
                return Err(VisionError::corrupt(
                    name,
                    "the file ends before the end-of-image marker (truncated)",
                ));
            }
            ImageFormat::Jpeg
        }
        SourceFormat::WebP => ImageFormat::WebP,
        SourceFormat::Tiff => ImageFormat::Tiff,
        SourceFormat::Dicom => {
            return Err(VisionError::InvalidArgument(
                "DICOM is not a raster format".into(),
            ));
        }
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), image_format);
    let mut limits = Limits::default();
    // The decoded image at up to 8 bytes a pixel (16-bit RGBA) plus room for the decoder.
    limits.max_alloc = Some(opts.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| image_error(name, e))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(name, width.into(), height.into(), opts.max_pixels)?;
    let orientation = decoder.orientation().unwrap_or_else(|_| {
        // PIL's exif_transpose also ignores EXIF it cannot parse.
        tracing::debug!(format = name, "unreadable EXIF orientation ignored");
        image::metadata::Orientation::NoTransforms
    });
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| image_error(name, e))?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// Width and height from a PNG's IHDR chunk (always the first chunk).
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
    };
    Some((word(16)?, word(20)?))
}

fn image_error(format: &'static str, error: ImageError) -> VisionError {
    match error {
        ImageError::Decoding(e) => VisionError::corrupt(format, e.to_string()),
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            VisionError::corrupt(format, "unexpected end of file (truncated)")
        }
        ImageError::IoError(e) => VisionError::corrupt(format, e.to_string()),
        ImageError::Limits(e) => VisionError::unsupported(format, e.to_string()),
        ImageError::Unsupported(e) => VisionError::unsupported(format, e.to_string()),
        ImageError::Parameter(e) => VisionError::corrupt(format, e.to_string()),
        ImageError::Encoding(e) => VisionError::corrupt(format, e.to_string()),
    }
}

/// What [`scan_jpeg`] learned from a JPEG's marker structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JpegInfo {
    /// Width and height from the first start-of-frame marker.
    pub(crate) size: Option<(u32, u32)>,
    /// Whether the end-of-image marker was reached.
    pub(crate) complete: bool,
}

/// Walks the markers of a JPEG (or JPEG-LS) stream: segment lengths must fit, entropy-coded
/// data is skipped up to the next marker. Stops at EOI; reaching the end of `bytes` first is
/// not an error here (`complete` is false) so that callers can use it on a header alone.
pub(crate) fn scan_jpeg(bytes: &[u8]) -> std::result::Result<JpegInfo, String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("missing the start-of-image marker".into());
    }
    let mut info = JpegInfo {
        size: None,
        complete: false,
    };
    let mut i = 2;
    loop {
        // Markers may be preceded by fill bytes 0xFF.
        if i >= bytes.len() {
            return Ok(info);
        }
        if bytes[i] != 0xFF {
            return Err(format!("expected a marker at byte {i}"));
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else {
            return Ok(info);
        };
        i += 1;
        match marker {
            0xD9 => {
                info.complete = true;
                return Ok(info);
            }
            // Standalone markers: TEM, RSTn, SOI.
            0x01 | 0xD0..=0xD8 => continue,
            0x00 => return Err(format!("invalid marker 0xFF00 at byte {}", i - 2)),
            _ => {}
        }
        let Some(len_bytes) = bytes.get(i..i + 2) else {
            return Ok(info);
        };
        let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        if len < 2 {
            return Err(format!("segment length {len} at byte {i}"));
        }
        let Some(segment) = bytes.get(i + 2..i + len) else {
            return Ok(info);
        };
        let is_sof = matches!(marker, 0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC))
            || marker == 0xF7;
        if is_sof && info.size.is_none() {
            if segment.len() < 5 {
                return Err("start-of-frame segment too short".into());
            }
            let height = u16::from_be_bytes([segment[1], segment[2]]);
            let width = u16::from_be_bytes([segment[3], segment[4]]);
            info.size = Some((width.into(), height.into()));
        }
        i += len;
        if marker == 0xDA {
            // Entropy-coded data: runs until a marker that is not a stuffed 0xFF00 or an RSTn.
            loop {
                let Some(&b) = bytes.get(i) else {
                    return Ok(info);
                };
                if b == 0xFF {
                    match bytes.get(i + 1) {
                        None => return Ok(info),
                        Some(0x00 | 0xD0..=0xD7) => i += 2,
                        // A fill byte: the marker starts at the next 0xFF.
                        Some(0xFF) => i += 1,
                        Some(_) => break,
                    }
                } else {
                    i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_scan_finds_size_and_end() {
        // SOI, SOF0 (8-bit, 3x2, 1 component), SOS, two data bytes with a stuffed FF00, EOI.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x00, 0x02, 0x00, 0x03, 0x01, 0x01, 0x11,
            0x00, 0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00, 0x12, 0xFF, 0x00,
            0xFF, 0xD9,
        ];
        let info = scan_jpeg(&jpeg).unwrap();
        assert_eq!(info.size, Some((3, 2)));
        assert!(info.complete);
        let cut = scan_jpeg(&jpeg[..jpeg.len() - 2]).unwrap();
        assert!(!cut.complete);
        assert!(scan_jpeg(&[0xFF, 0xD8, 0x00]).is_err());
    }
}
