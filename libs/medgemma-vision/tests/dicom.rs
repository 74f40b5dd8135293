//! DICOM decoding against pydicom (decode + modality LUT + VOI + the 8-bit definition of
//! tools/fixtures/vision_reference.py), on real files from pydicom / pydicom-data: the RG1
//! chest radiograph (CR, MONOCHROME1, 15 bits) uncompressed and in JPEG 2000, CT, MR, JPEG
//! lossless, color and palette images.

mod common;

use common::{
    ONE_LEVEL, blob_f32, dicom_bytes, diff_u8, entries, entry, max_diff_f32, sha256_hex, str_of,
    u32_of,
};
use medgemma_vision::{DecodeOptions, VisionError, decode_image, to_pixel_values};

/// Every DICOM reference: full-resolution 8-bit decode (strided sample) within one level of
/// pydicom's (two for lossy JPEG), and the Gemma pixel values within one level of
/// transformers' on pydicom's decode.
#[test]
fn dicom_decodes_within_one_level_of_pydicom() {
    let mut failures = Vec::new();
    for e in entries("dicom") {
        let Some(bytes) = dicom_bytes(&e) else {
            continue;
        };
        let key = str_of(&e, "key");
        let opts = DecodeOptions {
            frame: u32_of(&e, "frame"),
            ..DecodeOptions::default()
        };
        let img = match decode_image(&bytes, &opts) {
            Ok(img) => img,
            Err(err) => {
                failures.push(format!("{key}: {err}"));
                continue;
            }
        };
        assert_eq!(
            img.dimensions(),
            (u32_of(&e, "width"), u32_of(&e, "height")),
            "{key}"
        );

        let stride = u32_of(&e, "sample_stride") as usize;
        let color = matches!(str_of(&e, "voi"), "color" | "palette");
        let mut sample = Vec::new();
        for (y, row) in img.rows().enumerate().step_by(stride) {
            for px in row.step_by(stride) {
                if color {
                    sample.extend_from_slice(&px.0);
                } else {
                    assert!(
                        px.0[0] == px.0[1] && px.0[1] == px.0[2],
                        "{key}: gray row {y}"
                    );
                    sample.push(px.0[0]);
                }
            }
        }
        let (max, n) = diff_u8(&sample, &common::blob(str_of(&e, "sample")));
        let exact = sha256_hex(img.as_raw()) == str_of(&e, "rgb_sha256");

        let size = u32_of(&e, "pv_size");
        let pv: Vec<f32> = to_pixel_values(&img, size)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let pv_max = max_diff_f32(&pv, &blob_f32(str_of(&e, "pixel_values")));
        eprintln!(
            "{key:38} {:>4}x{:<4} {:12} sample max diff {max} ({n} differ), whole image \
             {}, pixel_values max {:.2} levels",
            img.width(),
            img.height(),
            str_of(&e, "voi"),
            if exact { "identical" } else { "not identical" },
            pv_max * 127.5
        );
        // Lossy JPEG in DICOM: jpeg-decoder and pydicom's libjpeg-turbo (through Pillow) round
        // the IDCT and chroma upsampling differently (as for JPEG files, see tests/parity.rs).
        let allowed = if str_of(&e, "transfer_syntax") == "1.2.840.10008.1.2.4.50" {
            2
        } else {
            1
        };
        if max > allowed {
            failures.push(format!("{key}: 8-bit decode differs by {max} levels"));
        }
        if pv_max > ONE_LEVEL {
            failures.push(format!("{key}: pixel values differ by {pv_max}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The real radiograph: uncompressed and both JPEG 2000 variants decode; the lossless one
/// matches pydicom exactly.
#[test]
fn chest_radiograph_rg1() {
    let e = entry("dcm_RG1_J2KI");
    let bytes = dicom_bytes(&e).expect("RG1_J2KI.dcm is committed");
    let img = decode_image(&bytes, &DecodeOptions::default()).unwrap();
    assert_eq!(img.dimensions(), (1841, 1955));
    for key in ["dcm_RG1_UNCI", "dcm_RG1_J2KR"] {
        let e = entry(key);
        let Some(bytes) = dicom_bytes(&e) else {
            continue;
        };
        let img = decode_image(&bytes, &DecodeOptions::default()).unwrap();
        assert_eq!(sha256_hex(img.as_raw()), str_of(&e, "rgb_sha256"), "{key}");
    }
}

#[test]
fn frame_selection() {
    let e = entry("dcm_eCT_Supplemental");
    let Some(bytes) = dicom_bytes(&e) else {
        return;
    };
    let frame = |frame| {
        decode_image(
            &bytes,
            &DecodeOptions {
                frame,
                ..DecodeOptions::default()
            },
        )
    };
    assert_ne!(frame(0).unwrap(), frame(1).unwrap());
    let e = frame(2).unwrap_err();
    assert!(
        matches!(
            e,
            VisionError::FrameOutOfRange {
                frame: 2,
                frames: 2
            }
        ),
        "{e}"
    );
}

#[test]
fn big_endian_and_jpeg2000_lossless_equal_little_endian() {
    let decode = |key: &str| {
        let bytes = dicom_bytes(&entry(key)).expect("committed");
        decode_image(&bytes, &DecodeOptions::default()).unwrap()
    };
    let little = decode("dcm_MR_small");
    assert_eq!(decode("dcm_MR_small_bigendian"), little);
    assert_eq!(decode("dcm_MR_small_jp2klossless"), little);
}
