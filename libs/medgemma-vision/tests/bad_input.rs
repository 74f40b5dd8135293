//! Bad input gives a specific error with a clear message, never a panic and never a partial
//! image: truncated and corrupt files, zero and giant dimensions, DICOM without pixel data,
//! unsupported transfer syntaxes, length bombs, limits.

mod common;

use std::io::Cursor;

use common::blob;
use medgemma_vision::hostile::{insert_before_pixel_data, nested_dicom_sequences, png_header_only};
use medgemma_vision::{DecodeOptions, RgbImage, VisionError, decode_image};

fn decode(bytes: &[u8]) -> Result<RgbImage, VisionError> {
    decode_image(bytes, &DecodeOptions::default())
}

fn expect_err(bytes: &[u8]) -> VisionError {
    match decode(bytes) {
        Ok(img) => panic!(
            "decoded a {}x{} image, expected an error",
            img.width(),
            img.height()
        ),
        Err(e) => e,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("pattern {needle:02X?} not found"))
}

/// MR_small.dcm (explicit VR little endian) with the US value of `tag` replaced.
fn mr_small_with_us(tag: [u8; 4], value: u16) -> Vec<u8> {
    let mut bytes = blob("MR_small.dcm");
    let mut header = tag.to_vec();
    header.extend_from_slice(b"US\x02\x00");
    let at = find(&bytes, &header) + header.len();
    bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    bytes
}

const ROWS: [u8; 4] = [0x28, 0x00, 0x10, 0x00];
const COLUMNS: [u8; 4] = [0x28, 0x00, 0x11, 0x00];
const PIXEL_DATA: [u8; 4] = [0xE0, 0x7F, 0x10, 0x00];

#[test]
fn empty_unknown_and_too_large() {
    assert!(matches!(expect_err(b""), VisionError::Empty));
    let e = expect_err(b"GIF89a\x01\x00\x01\x00");
    assert!(matches!(e, VisionError::UnknownFormat), "{e}");
    assert!(
        e.to_string().contains("PNG, JPEG, WebP, TIFF, or DICOM"),
        "{e}"
    );
    let png = blob("gradient.png");
    let e = decode_image(
        &png,
        &DecodeOptions {
            max_encoded_bytes: 1000,
            ..DecodeOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, VisionError::EncodedTooLarge { limit: 1000, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("over the limit of 1000 bytes"),
        "{e}"
    );
}

#[test]
fn zero_and_giant_dimensions() {
    let e = expect_err(&png_header_only(0, 10));
    assert!(
        matches!(
            e,
            VisionError::ZeroDimension {
                width: 0,
                height: 10,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("zero dimension"), "{e}");

    let e = expect_err(&png_header_only(100_000, 100_000));
    assert!(
        matches!(
            e,
            VisionError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("over the limit of 100000000 pixels"),
        "{e}"
    );

    // The pixel limit is the caller's.
    let e = decode_image(
        &blob("gradient.png"),
        &DecodeOptions {
            max_pixels: 1000,
            ..DecodeOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            VisionError::TooManyPixels {
                width: 331,
                height: 197,
                ..
            }
        ),
        "{e}"
    );

    // JPEG: the limit applies from the frame header.
    let e = decode_image(
        &blob("exif_444.jpg"),
        &DecodeOptions {
            max_pixels: 1000,
            ..DecodeOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, VisionError::TooManyPixels { .. }), "{e}");

    // DICOM: Rows 0; Rows x Columns 65535 x 65535.
    let e = expect_err(&mr_small_with_us(ROWS, 0));
    assert!(
        matches!(
            e,
            VisionError::ZeroDimension {
                format: "DICOM",
                ..
            }
        ),
        "{e}"
    );
    let giant = mr_small_with_us(ROWS, 65535);
    let giant = {
        let mut g = giant;
        let mut header = COLUMNS.to_vec();
        header.extend_from_slice(b"US\x02\x00");
        let at = find(&g, &header) + header.len();
        g[at..at + 2].copy_from_slice(&65535u16.to_le_bytes());
        g
    };
    let e = expect_err(&giant);
    assert!(
        matches!(
            e,
            VisionError::TooManyPixels {
                format: "DICOM",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn truncated_files_are_errors() {
    for (file, format) in [
        ("gradient.png", "PNG"),
        ("exif_444.jpg", "JPEG"),
        ("exif_420.jpg", "JPEG"),
        ("MR_small.dcm", "DICOM"),
        ("CT_small.dcm", "DICOM"),
        ("MR_small_jp2klossless.dcm", "DICOM"),
        ("SC_rgb_rle.dcm", "DICOM"),
        ("US1_J2KI.dcm", "DICOM"),
    ] {
        let bytes = blob(file);
        for tenth in 3..10 {
            let cut = bytes.len() * tenth / 10;
            let e = expect_err(&bytes[..cut]);
            let message = e.to_string();
            // A DICOM cut before its Pixel Data element is a valid object without pixels.
            let before_pixels = format == "DICOM"
                && bytes
                    .windows(4)
                    .position(|w| w == PIXEL_DATA)
                    .is_some_and(|at| cut <= at);
            assert!(
                matches!(e, VisionError::Corrupt { format: f, .. } if f == format)
                    || (before_pixels && matches!(e, VisionError::MissingPixelData)),
                "{file} cut at {cut}: {message}"
            );
        }
    }
    let e = expect_err(&blob("exif_444.jpg")[..15_000]);
    assert!(e.to_string().contains("truncated"), "{e}");
    // pydicom's own truncated example: pixel data shorter than its header says.
    let e = expect_err(&blob("MR_truncated.dcm"));
    assert!(
        matches!(
            e,
            VisionError::Corrupt {
                format: "DICOM",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn dicom_without_pixel_data() {
    let bytes = blob("MR_small.dcm");
    let at = find(&bytes, &PIXEL_DATA);
    let e = expect_err(&bytes[..at]);
    assert!(matches!(e, VisionError::MissingPixelData), "{e}");
    assert!(e.to_string().contains("no pixel data (7FE0,0010)"), "{e}");
}

#[test]
fn unsupported_transfer_syntaxes() {
    // JPEG-LS: known, but this build has no JPEG-LS decoder (CharLS is a C library).
    let e = expect_err(&blob("MR_small_jpeg_ls_lossless.dcm"));
    let VisionError::UnsupportedTransferSyntax { uid, name } = &e else {
        panic!("expected UnsupportedTransferSyntax, got {e}");
    };
    assert_eq!(uid, "1.2.840.10008.1.2.4.80");
    assert!(name.contains("JPEG-LS"), "{name}");
    assert!(
        e.to_string().contains("unsupported DICOM transfer syntax"),
        "{e}"
    );
    // An unknown UID (same length, so the meta group stays valid).
    let mut bytes = blob("MR_small.dcm");
    let at = find(&bytes, b"1.2.840.10008.1.2.1\0");
    bytes[at..at + 19].copy_from_slice(b"1.2.3.4.5.6.7.8.9.0");
    let e = expect_err(&bytes);
    assert!(
        matches!(&e, VisionError::UnsupportedTransferSyntax { uid, .. } if uid == "1.2.3.4.5.6.7.8.9.0"),
        "{e}"
    );
    // Deflated data sets are refused (inflating them is unbounded).
    let mut bytes = blob("MR_small.dcm");
    let at = find(&bytes, b"1.2.840.10008.1.2.1\0");
    let mut uid = b"1.2.840.10008.1.2.1.99".to_vec();
    uid.resize(22, 0);
    // Longer UID: rewrite the element's 2-byte length too (group length is not checked).
    bytes[at - 2..at].copy_from_slice(&22u16.to_le_bytes());
    bytes.splice(at..at + 20, uid);
    let e = expect_err(&bytes);
    assert!(
        matches!(e, VisionError::UnsupportedTransferSyntax { .. }),
        "{e}"
    );
}

#[test]
fn dicom_length_bomb_is_refused_before_allocation() {
    // Pixel Data declaring ~4 GB in a 10 kB file.
    let mut bytes = blob("MR_small.dcm");
    let at = find(&bytes, &PIXEL_DATA);
    assert_eq!(&bytes[at + 4..at + 6], b"OW");
    bytes[at + 8..at + 12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let e = expect_err(&bytes);
    assert!(
        matches!(
            e,
            VisionError::Corrupt {
                format: "DICOM",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("declares 4294967280 bytes"), "{e}");
}

#[test]
fn frames_out_of_range() {
    let e = decode_image(
        &blob("gradient.png"),
        &DecodeOptions {
            frame: 1,
            ..DecodeOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            VisionError::FrameOutOfRange {
                frame: 1,
                frames: 1
            }
        ),
        "{e}"
    );
    let e = decode_image(
        &blob("MR_small.dcm"),
        &DecodeOptions {
            frame: 3,
            ..DecodeOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            VisionError::FrameOutOfRange {
                frame: 3,
                frames: 1
            }
        ),
        "{e}"
    );
}

#[test]
fn webp_and_tiff_round_trip_and_truncation() {
    let img = RgbImage::from_fn(37, 23, |x, y| image::Rgb([x as u8 * 6, y as u8 * 11, 200]));
    for (format, name) in [
        (image::ImageFormat::WebP, "WebP"),
        (image::ImageFormat::Tiff, "TIFF"),
    ] {
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap();
        // Both encoders are lossless here.
        assert_eq!(decode(&bytes).unwrap(), img, "{name}");
        let e = expect_err(&bytes[..bytes.len() * 2 / 3]);
        assert!(
            matches!(e, VisionError::Corrupt { format: f, .. } if f == name),
            "{name}: {e}"
        );
    }
    // Grayscale becomes RGB.
    let gray = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageLuma8(gray.clone())
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    let rgb = decode(&bytes).unwrap();
    assert!(
        rgb.enumerate_pixels()
            .all(|(x, y, p)| p.0 == [gray.get_pixel(x, y).0[0]; 3])
    );
}

#[test]
fn dicom_nesting_and_element_bombs_are_refused_before_parsing() {
    let base = blob("MR_small.dcm");
    let with = |inserted: &[u8]| insert_before_pixel_data(&base, inserted).unwrap();
    // 4 levels are fine and decode as before.
    assert_eq!(
        decode(&with(&nested_dicom_sequences(4))).unwrap(),
        decode(&base).unwrap()
    );
    // 10,000 levels (320 KB): refused by the pre-parse walk, on a thread with a small stack
    // (the walk is iterative; dicom-rs never sees the object).
    let bomb = with(&nested_dicom_sequences(10_000));
    let e = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || expect_err(&bomb))
        .unwrap()
        .join()
        .unwrap();
    assert!(
        matches!(
            e,
            VisionError::DicomTooComplex {
                option: "max_dicom_depth",
                limit: 32,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("sequence nesting depth"), "{e}");
    // Many small elements: over the element cap.
    let opts = DecodeOptions {
        max_dicom_elements: 1_000,
        ..DecodeOptions::default()
    };
    let many: Vec<u8> = (0..1_000)
        .flat_map(|_| [0x09, 0x00, 0x10, 0x00, b'L', b'O', 0, 0])
        .collect();
    let e = decode_image(&with(&many), &opts).unwrap_err();
    assert!(
        matches!(
            e,
            VisionError::DicomTooComplex {
                option: "max_dicom_elements",
                ..
            }
        ),
        "{e}"
    );
}
