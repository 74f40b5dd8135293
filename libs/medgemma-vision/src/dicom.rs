//! DICOM -> 8-bit RGB.
//!
//! dicom-rs parses the object and decodes the pixel data of one frame (uncompressed in either
//! byte order, RLE, JPEG baseline/extended/lossless, JPEG 2000); the display pipeline that
//! turns stored values into 8 bits is ours, so that it matches pydicom's step by step:
//!
//! 1. stored values: bits outside Bits Stored cleared, sign-extended when Pixel Representation
//!    is 1;
//! 2. modality LUT: the Modality LUT Sequence, else Rescale Slope / Intercept (top level, else
//!    the frame's or the shared functional group), else identity;
//! 3. VOI: the first VOI LUT Sequence item, else the first Window Center / Width with the VOI
//!    LUT Function (LINEAR as PS3.3 C.11.2.1.2.1, LINEAR_EXACT, SIGMOID), else min-max of the
//!    frame; each gives t in [0, 1] (a VOI LUT's output divided by 2^bits - 1);
//! 4. 8 bits: floor(255 t + 0.5); MONOCHROME1 inverted (255 - v); gray repeated into RGB.
//!
//! Color images (RGB, YBR_FULL, and what the JPEG / JPEG 2000 decoders return as RGB) are
//! taken as is, scaled to 8 bits when Bits Stored is above 8; PALETTE COLOR goes through its
//! palette. Before dicom-rs sees the bytes, a walk over the element headers checks every
//! declared length against the bytes that remain, the dimensions in the header and in any
//! JPEG / JPEG 2000 codestream are checked against the pixel limit, and RLE frames are
//! checked for their segment table.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::RgbImage;

use crate::decode::{DecodeOptions, check_dimensions, scan_jpeg};
use crate::dicom_walk::{WalkError, WalkLimits, walk_dataset, walk_meta};
use crate::error::{Result, VisionError};

const F: &str = "DICOM";

type Element = dicom_object::mem::InMemElement<dicom_dictionary_std::StandardDataDictionary>;

/// Decodes the frame `opts.frame` of a DICOM Part 10 file (`bytes` holds the preamble).
pub(crate) fn decode_dicom(bytes: &[u8], opts: &DecodeOptions) -> Result<RgbImage> {
    let body = bytes
        .get(128..)
        .ok_or_else(|| VisionError::corrupt(F, "shorter than the 128-byte preamble"))?;
    let meta = walk_meta(body).map_err(|e| VisionError::corrupt(F, e))?;
    let uid = meta.transfer_syntax.as_str();
    let ts =
        TransferSyntaxRegistry
            .get(uid)
            .ok_or_else(|| VisionError::UnsupportedTransferSyntax {
                uid: uid.to_string(),
                name: "unknown transfer syntax".to_string(),
            })?;
    if !ts.can_decode_all() {
        return Err(VisionError::UnsupportedTransferSyntax {
            uid: uid.to_string(),
            name: ts.name().to_string(),
        });
    }
    let limits = WalkLimits {
        max_depth: opts.max_dicom_depth,
        max_elements: opts.max_dicom_elements,
    };
    walk_dataset(body, meta.dataset_start, uid, limits).map_err(|e| match e {
        WalkError::Corrupt(detail) => VisionError::corrupt(F, detail),
        WalkError::TooDeep => VisionError::DicomTooComplex {
            what: "sequence nesting depth",
            limit: opts.max_dicom_depth.into(),
            option: "max_dicom_depth",
        },
        WalkError::TooManyElements => VisionError::DicomTooComplex {
            what: "element count",
            limit: opts.max_dicom_elements,
            option: "max_dicom_elements",
        },
    })?;

    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(body)
        .map_err(|e| VisionError::corrupt(F, e.to_string()))?;
    decode_object(&obj, opts)
}

fn decode_object(obj: &DefaultDicomObject, opts: &DecodeOptions) -> Result<RgbImage> {
    let pixel_data = obj
        .get(tags::PIXEL_DATA)
        .ok_or(VisionError::MissingPixelData)?;
    let info = ImageInfo::read(obj)?;
    check_dimensions(F, info.cols.into(), info.rows.into(), opts.max_pixels)?;
    if opts.frame >= info.frames {
        return Err(VisionError::FrameOutOfRange {
            frame: opts.frame,
            frames: info.frames,
        });
    }
    let encapsulated = matches!(pixel_data.value(), Value::PixelSequence(_));
    if let Value::PixelSequence(seq) = pixel_data.value() {
        let rle = obj.meta().transfer_syntax() == RLE_LOSSLESS;
        for fragment in seq.fragments() {
            if rle {
                check_rle(fragment, &info)?;
            } else {
                check_codestream(fragment, &info, opts.max_pixels)?;
            }
        }
    }
    if !encapsulated && info.photometric.subsampled() {
        return Err(VisionError::unsupported(
            F,
            format!(
                "uncompressed {} pixel data (chroma-subsampled)",
                info.photometric.name()
            ),
        ));
    }

    let decoded = obj.decode_pixel_data_frame(opts.frame).map_err(|e| {
        // dicom-pixeldata's error is opaque: tell "not supported" from "broken" by its text.
        let detail = format!("pixel data: {}", error_chain(&e));
        let lower = detail.to_ascii_lowercase();
        if lower.contains("unsupported") || lower.contains("not supported") {
            VisionError::unsupported(F, detail)
        } else {
            VisionError::corrupt(F, detail)
        }
    })?;
    let samples_per_pixel = usize::from(info.samples_per_pixel);
    let pixels = usize::from(info.rows) * usize::from(info.cols);
    let bytes_per_sample = if info.bits_allocated == 1 {
        1
    } else {
        usize::from(info.bits_allocated / 8)
    };
    let needed = pixels * samples_per_pixel * bytes_per_sample;
    let data = decoded.data();
    if data.len() < needed {
        return Err(VisionError::corrupt(
            F,
            format!(
                "frame {} holds {} bytes of pixel data, {}x{}x{} samples of {} bits need {needed}",
                opts.frame,
                data.len(),
                info.cols,
                info.rows,
                info.samples_per_pixel,
                info.bits_allocated
            ),
        ));
    }
    let data = &data[..needed];
    let planar = !encapsulated
        && samples_per_pixel == 3
        && matches!(
            decoded.planar_configuration(),
            dicom_pixeldata::PlanarConfiguration::PixelFirst
        );
    // The JPEG and JPEG 2000 decoders return color as RGB.
    let photometric = if encapsulated && samples_per_pixel == 3 {
        Photometric::Rgb
    } else {
        info.photometric
    };
    let samples = stored_values(data, &info);
    let rgb = match photometric {
        Photometric::Monochrome1 | Photometric::Monochrome2 => {
            let pipeline = GrayPipeline::read(obj, &info, opts.frame)?;
            let gray = pipeline.apply(&samples)?;
            gray.iter().flat_map(|&v| [v, v, v]).collect()
        }
        Photometric::Palette => palette(obj, &samples, &info)?,
        Photometric::Rgb | Photometric::YbrFull => {
            let mut rgb = color_to_8bit(&samples, pixels, planar, info.bits_stored);
            if photometric == Photometric::YbrFull {
                ybr_full_to_rgb(&mut rgb);
            }
            rgb
        }
        Photometric::YbrFull422 | Photometric::YbrIct | Photometric::YbrRct => {
            return Err(VisionError::unsupported(
                F,
                format!("{} pixel data in this transfer syntax", photometric.name()),
            ));
        }
    };
    RgbImage::from_raw(info.cols.into(), info.rows.into(), rgb)
        .ok_or_else(|| VisionError::corrupt(F, "decoded pixel buffer has the wrong size"))
}

/// An error and its sources, for codec errors (which name features and limits, not values).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Photometric {
    Monochrome1,
    Monochrome2,
    Palette,
    Rgb,
    YbrFull,
    YbrFull422,
    YbrIct,
    YbrRct,
}

impl Photometric {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "MONOCHROME1" => Self::Monochrome1,
            "MONOCHROME2" => Self::Monochrome2,
            "PALETTE COLOR" => Self::Palette,
            "RGB" => Self::Rgb,
            "YBR_FULL" => Self::YbrFull,
            "YBR_FULL_422" => Self::YbrFull422,
            "YBR_ICT" => Self::YbrIct,
            "YBR_RCT" => Self::YbrRct,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Monochrome1 => "MONOCHROME1",
            Self::Monochrome2 => "MONOCHROME2",
            Self::Palette => "PALETTE COLOR",
            Self::Rgb => "RGB",
            Self::YbrFull => "YBR_FULL",
            Self::YbrFull422 => "YBR_FULL_422",
            Self::YbrIct => "YBR_ICT",
            Self::YbrRct => "YBR_RCT",
        }
    }

    fn samples_per_pixel(self) -> u16 {
        match self {
            Self::Monochrome1 | Self::Monochrome2 | Self::Palette => 1,
            Self::Rgb | Self::YbrFull | Self::YbrFull422 | Self::YbrIct | Self::YbrRct => 3,
        }
    }

    fn subsampled(self) -> bool {
        self == Self::YbrFull422
    }
}

/// The Image Pixel module attributes we need, validated.
#[derive(Debug, Clone)]
struct ImageInfo {
    rows: u16,
    cols: u16,
    samples_per_pixel: u16,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    photometric: Photometric,
    frames: u32,
}

impl ImageInfo {
    fn read(obj: &InMemDicomObject) -> Result<Self> {
        let rows = required_u16(obj, tags::ROWS, "Rows (0028,0010)")?;
        let cols = required_u16(obj, tags::COLUMNS, "Columns (0028,0011)")?;
        if rows == 0 || cols == 0 {
            return Err(VisionError::ZeroDimension {
                format: F,
                width: cols.into(),
                height: rows.into(),
            });
        }
        let pi_name = "Photometric Interpretation (0028,0004)";
        let pi_text = obj
            .get(tags::PHOTOMETRIC_INTERPRETATION)
            .ok_or_else(|| VisionError::attribute(pi_name, "missing"))?
            .to_str()
            .map_err(|_| VisionError::attribute(pi_name, "not text"))?;
        let pi_text = pi_text.trim_end_matches(['\0', ' ']).to_string();
        let photometric = Photometric::parse(&pi_text).ok_or_else(|| {
            let shown: String = pi_text
                .chars()
                .filter(char::is_ascii_graphic)
                .take(24)
                .collect();
            VisionError::unsupported(F, format!("photometric interpretation {shown:?}"))
        })?;
        let samples_per_pixel = optional_u16(
            obj,
            tags::SAMPLES_PER_PIXEL,
            "Samples per Pixel (0028,0002)",
        )?
        .unwrap_or(1);
        if samples_per_pixel != photometric.samples_per_pixel() {
            return Err(VisionError::attribute(
                "Samples per Pixel (0028,0002)",
                format!("{samples_per_pixel} does not fit {}", photometric.name()),
            ));
        }
        let bits_allocated = required_u16(obj, tags::BITS_ALLOCATED, "Bits Allocated (0028,0100)")?;
        if !matches!(bits_allocated, 1 | 8 | 16 | 32) {
            return Err(VisionError::unsupported(
                F,
                format!("Bits Allocated {bits_allocated} (expected 1, 8, 16 or 32)"),
            ));
        }
        let bits_stored = optional_u16(obj, tags::BITS_STORED, "Bits Stored (0028,0101)")?
            .unwrap_or(bits_allocated);
        if bits_stored == 0 || bits_stored > bits_allocated {
            return Err(VisionError::attribute(
                "Bits Stored (0028,0101)",
                format!("{bits_stored} with Bits Allocated {bits_allocated}"),
            ));
        }
        let representation = optional_u16(
            obj,
            tags::PIXEL_REPRESENTATION,
            "Pixel Representation (0028,0103)",
        )?
        .unwrap_or(0);
        let frames = match obj.get(tags::NUMBER_OF_FRAMES) {
            None => 1,
            Some(e) => {
                let text = e.to_str().map_err(|_| {
                    VisionError::attribute("Number of Frames (0028,0008)", "not an integer")
                })?;
                let text = text.trim_matches(['\0', ' ']);
                if text.is_empty() {
                    1
                } else {
                    text.parse::<u32>().map_err(|_| {
                        VisionError::attribute("Number of Frames (0028,0008)", "not an integer")
                    })?
                }
            }
        };
        if frames == 0 {
            return Err(VisionError::attribute(
                "Number of Frames (0028,0008)",
                "is 0",
            ));
        }
        Ok(Self {
            rows,
            cols,
            samples_per_pixel,
            bits_allocated,
            bits_stored,
            signed: representation == 1,
            photometric,
            frames,
        })
    }
}

fn required_u16(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<u16> {
    optional_u16(obj, tag, name)?.ok_or_else(|| VisionError::attribute(name, "missing"))
}

fn optional_u16(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<Option<u16>> {
    let Some(element) = obj.get(tag) else {
        return Ok(None);
    };
    let value: i64 = element
        .to_int()
        .map_err(|_| VisionError::attribute(name, "not an integer"))?;
    u16::try_from(value)
        .map(Some)
        .map_err(|_| VisionError::attribute(name, format!("{value} is out of range")))
}

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Checks an RLE Lossless frame (PS3.5 Annex G) before dicom-rs decodes it (its decoder indexes
/// the header and the segments without bounds checks): a 64-byte header with one segment per
/// byte of each sample, offsets inside the fragment, and every segment decoding to at least
/// Rows x Columns bytes. Counts PackBits output without allocating it.
fn check_rle(fragment: &[u8], info: &ImageInfo) -> Result<()> {
    let corrupt = |detail: String| VisionError::corrupt(F, format!("RLE frame: {detail}"));
    let word = |i: usize| -> Option<usize> {
        let b = fragment.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let segments = word(0).ok_or_else(|| corrupt("shorter than its 64-byte header".into()))?;
    if fragment.len() < 64 {
        return Err(corrupt("shorter than its 64-byte header".into()));
    }
    let bytes_per_sample = usize::from(info.bits_allocated.div_ceil(8));
    let expected = bytes_per_sample * usize::from(info.samples_per_pixel);
    if segments != expected {
        return Err(corrupt(format!("{segments} segments, expected {expected}")));
    }
    let pixels = usize::from(info.rows) * usize::from(info.cols);
    for s in 0..segments {
        let start = word(1 + s).unwrap_or(0);
        let end = if s + 1 < segments {
            word(2 + s).unwrap_or(0)
        } else {
            fragment.len()
        };
        if start < 64 || start > end || end > fragment.len() {
            return Err(corrupt(format!(
                "segment {s} offsets {start}..{end} out of range"
            )));
        }
        let decoded = packbits_len(&fragment[start..end]);
        if decoded < pixels {
            return Err(corrupt(format!(
                "segment {s} decodes to {decoded} bytes, the frame needs {pixels}"
            )));
        }
    }
    Ok(())
}

/// The number of bytes a PackBits segment decodes to (as dicom-rs's reader counts them).
fn packbits_len(segment: &[u8]) -> usize {
    let (mut i, mut out) = (0usize, 0usize);
    while i < segment.len() {
        let h = segment[i] as i8;
        i += 1;
        if h >= 0 {
            let n = h as usize + 1;
            out += n.min(segment.len() - i);
            i += n;
        } else if h != -128 {
            if i >= segment.len() {
                break;
            }
            out += (1 - isize::from(h)) as usize;
            i += 1;
        }
    }
    out
}

/// Checks the dimensions a JPEG or JPEG 2000 codestream declares (what its decoder will
/// allocate) against the pixel limit and against Rows / Columns.
fn check_codestream(fragment: &[u8], info: &ImageInfo, max_pixels: u64) -> Result<()> {
    let size = if fragment.starts_with(&[0xFF, 0xD8]) {
        scan_jpeg(fragment)
            .map_err(|e| VisionError::corrupt(F, format!("JPEG codestream: {e}")))?
            .size
    } else {
        j2k_size(fragment)
    };
    let Some((width, height)) = size else {
        return Ok(());
    };
    check_dimensions(F, width.into(), height.into(), max_pixels)?;
    if (width, height) != (u32::from(info.cols), u32::from(info.rows)) {
        return Err(VisionError::corrupt(
            F,
            format!(
                "the compressed frame is {width}x{height} but Columns x Rows say {}x{}",
                info.cols, info.rows
            ),
        ));
    }
    Ok(())
}

/// Width and height from a JPEG 2000 codestream's SIZ segment (a raw codestream, or one inside
/// a JP2 file's first kilobytes).
fn j2k_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let head = &bytes[..bytes.len().min(4096)];
    let start = head
        .windows(4)
        .position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])?;
    // SOC, SIZ marker, Lsiz (2), Rsiz (2), Xsiz, Ysiz, XOsiz, YOsiz (4 each).
    let siz = bytes.get(start + 8..start + 24)?;
    let word = |i: usize| u32::from_be_bytes([siz[i], siz[i + 1], siz[i + 2], siz[i + 3]]);
    let (x, y, x0, y0) = (word(0), word(4), word(8), word(12));
    Some((x.saturating_sub(x0), y.saturating_sub(y0)))
}

/// The samples of one frame as integers: bits above Bits Stored cleared, sign-extended when
/// signed. 1-bit data comes from dicom-rs as bytes of 0 or 255.
fn stored_values(data: &[u8], info: &ImageInfo) -> Vec<i64> {
    let bits = u32::from(info.bits_stored);
    let fix = |raw: u64| -> i64 {
        let mask = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let v = raw & mask;
        if info.signed && bits < 64 && v >> (bits - 1) & 1 == 1 {
            v as i64 - (1i64 << bits)
        } else {
            v as i64
        }
    };
    match info.bits_allocated {
        1 => data.iter().map(|&b| i64::from(b != 0)).collect(),
        8 => data.iter().map(|&b| fix(b.into())).collect(),
        16 => data
            .chunks_exact(2)
            .map(|c| fix(u16::from_ne_bytes([c[0], c[1]]).into()))
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|c| fix(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]).into()))
            .collect(),
    }
}

/// A lookup table (Modality LUT or VOI LUT, PS3.3 C.11.1 / C.11.2).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Lut {
    /// The first stored value mapped; values below map to the first entry.
    pub(crate) first_mapped: i64,
    /// Bits of each entry (from the LUT Descriptor): the output range is 0..2^bits - 1.
    pub(crate) bits: u32,
    pub(crate) data: Vec<u16>,
}

impl Lut {
    fn lookup(&self, x: f64) -> f64 {
        let last = self.data.len().saturating_sub(1);
        let index = if x < self.first_mapped as f64 {
            0
        } else {
            // Truncated as pydicom's integer cast does; saturates for huge inputs.
            ((x - self.first_mapped as f64) as usize).min(last)
        };
        self.data.get(index).copied().map_or(0.0, f64::from)
    }

    fn max_output(&self) -> f64 {
        (2f64).powi(self.bits as i32) - 1.0
    }
}

/// How stored values map to the modality's units.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Modality {
    Identity,
    Rescale { slope: f64, intercept: f64 },
    Lut(Lut),
}

/// VOI LUT Function (0028,1056).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// How modality values map to display values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Voi {
    Window {
        center: f64,
        width: f64,
        function: WindowFunction,
    },
    Lut(Lut),
    MinMax,
}

/// The grayscale display pipeline: modality LUT, VOI, MONOCHROME1 inversion, 8 bits.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GrayPipeline {
    pub(crate) modality: Modality,
    pub(crate) voi: Voi,
    pub(crate) invert: bool,
}

impl GrayPipeline {
    fn read(obj: &InMemDicomObject, info: &ImageInfo, frame: u32) -> Result<Self> {
        Ok(Self {
            modality: read_modality(obj, info, frame)?,
            voi: read_voi(obj, info, frame)?,
            invert: info.photometric == Photometric::Monochrome1,
        })
    }

    /// Stored values to 8-bit display values.
    pub(crate) fn apply(&self, stored: &[i64]) -> Result<Vec<u8>> {
        let modality: Vec<f64> = match &self.modality {
            Modality::Identity => stored.iter().map(|&v| v as f64).collect(),
            Modality::Rescale { slope, intercept } => stored
                .iter()
                .map(|&v| v as f64 * slope + intercept)
                .collect(),
            Modality::Lut(lut) => stored.iter().map(|&v| lut.lookup(v as f64)).collect(),
        };
        let to_unit: Box<dyn Fn(f64) -> f64> = match &self.voi {
            Voi::Window {
                center,
                width,
                function,
            } => window_fn(*center, *width, *function)?,
            Voi::Lut(lut) => {
                let lut = lut.clone();
                let max = lut.max_output();
                Box::new(move |x| lut.lookup(x) / max)
            }
            Voi::MinMax => {
                let (lo, hi) = modality
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                        (lo.min(v), hi.max(v))
                    });
                if hi > lo {
                    Box::new(move |x| (x - lo) / (hi - lo))
                } else {
                    Box::new(|_| 0.0)
                }
            }
        };
        Ok(modality
            .iter()
            .map(|&x| {
                let v = to_8bit(to_unit(x));
                if self.invert { 255 - v } else { v }
            })
            .collect())
    }
}

/// [0, 1] -> 0..=255 as floor(255 t + 0.5), clamped.
fn to_8bit(t: f64) -> u8 {
    let v = (t * 255.0 + 0.5).floor();
    if v.is_nan() {
        0
    } else {
        v.clamp(0.0, 255.0) as u8
    }
}

/// The VOI window function of PS3.3 C.11.2.1.2 (LINEAR) and C.11.2.1.3 (LINEAR_EXACT,
/// SIGMOID), with output range [0, 1].
fn window_fn(center: f64, width: f64, function: WindowFunction) -> Result<Box<dyn Fn(f64) -> f64>> {
    let attr = "Window Width (0028,1051)";
    match function {
        WindowFunction::Linear => {
            if width < 1.0 || width.is_nan() {
                return Err(VisionError::attribute(
                    attr,
                    "must be at least 1 for LINEAR",
                ));
            }
            let (c, w) = (center - 0.5, width - 1.0);
            Ok(Box::new(move |x| {
                if x <= c - w / 2.0 {
                    0.0
                } else if x > c + w / 2.0 {
                    1.0
                } else {
                    (x - c) / w + 0.5
                }
            }))
        }
        WindowFunction::LinearExact => {
            if width <= 0.0 || width.is_nan() {
                return Err(VisionError::attribute(
                    attr,
                    "must be above 0 for LINEAR_EXACT",
                ));
            }
            Ok(Box::new(move |x| {
                if x <= center - width / 2.0 {
                    0.0
                } else if x > center + width / 2.0 {
                    1.0
                } else {
                    (x - center) / width + 0.5
                }
            }))
        }
        WindowFunction::Sigmoid => {
            if width <= 0.0 || width.is_nan() {
                return Err(VisionError::attribute(attr, "must be above 0 for SIGMOID"));
            }
            Ok(Box::new(move |x| {
                1.0 / (1.0 + (-4.0 * (x - center) / width).exp())
            }))
        }
    }
}

/// Finds an attribute at the top level, else in the frame's item of the Per-frame Functional
/// Groups Sequence, else in the Shared Functional Groups Sequence, inside the functional group
/// `group` (e.g. Pixel Value Transformation Sequence).
fn find<'a>(obj: &'a InMemDicomObject, frame: u32, group: Tag, tag: Tag) -> Option<&'a Element> {
    if let Some(e) = obj.get(tag) {
        return Some(e);
    }
    let in_groups = |sequence: Tag, index: usize| -> Option<&'a Element> {
        obj.get(sequence)?
            .items()?
            .get(index)?
            .get(group)?
            .items()?
            .first()?
            .get(tag)
    };
    in_groups(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frame as usize)
        .or_else(|| in_groups(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, 0))
}

fn first_float(element: &Element, name: &'static str) -> Result<f64> {
    let values = element
        .to_multi_float64()
        .map_err(|_| VisionError::attribute(name, "not a number"))?;
    match values.first() {
        Some(v) if v.is_finite() => Ok(*v),
        Some(_) => Err(VisionError::attribute(name, "not a finite number")),
        None => Err(VisionError::attribute(name, "empty")),
    }
}

fn read_modality(obj: &InMemDicomObject, info: &ImageInfo, frame: u32) -> Result<Modality> {
    if let Some(item) = obj
        .get(tags::MODALITY_LUT_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.first())
    {
        return Ok(Modality::Lut(read_lut(
            item,
            info,
            "Modality LUT Sequence (0028,3000)",
        )?));
    }
    let group = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
    let slope = find(obj, frame, group, tags::RESCALE_SLOPE);
    let intercept = find(obj, frame, group, tags::RESCALE_INTERCEPT);
    match (slope, intercept) {
        (Some(slope), Some(intercept)) => Ok(Modality::Rescale {
            slope: first_float(slope, "Rescale Slope (0028,1053)")?,
            intercept: first_float(intercept, "Rescale Intercept (0028,1052)")?,
        }),
        _ => Ok(Modality::Identity),
    }
}

fn read_voi(obj: &InMemDicomObject, info: &ImageInfo, frame: u32) -> Result<Voi> {
    if let Some(item) = obj
        .get(tags::VOILUT_SEQUENCE)
        .and_then(|e| e.items())
        .and_then(|items| items.first())
    {
        return Ok(Voi::Lut(read_lut(
            item,
            info,
            "VOI LUT Sequence (0028,3010)",
        )?));
    }
    let group = tags::FRAME_VOILUT_SEQUENCE;
    let center = find(obj, frame, group, tags::WINDOW_CENTER);
    let width = find(obj, frame, group, tags::WINDOW_WIDTH);
    let (Some(center), Some(width)) = (center, width) else {
        return Ok(Voi::MinMax);
    };
    let function = match find(obj, frame, group, tags::VOILUT_FUNCTION) {
        None => WindowFunction::Linear,
        Some(e) => {
            let name = "VOI LUT Function (0028,1056)";
            let text = e
                .to_str()
                .map_err(|_| VisionError::attribute(name, "not text"))?;
            match text.trim_matches(['\0', ' ']).to_ascii_uppercase().as_str() {
                "" | "LINEAR" => WindowFunction::Linear,
                "LINEAR_EXACT" => WindowFunction::LinearExact,
                "SIGMOID" => WindowFunction::Sigmoid,
                _ => {
                    return Err(VisionError::attribute(
                        name,
                        "not LINEAR, LINEAR_EXACT or SIGMOID",
                    ));
                }
            }
        }
    };
    Ok(Voi::Window {
        center: first_float(center, "Window Center (0028,1050)")?,
        width: first_float(width, "Window Width (0028,1051)")?,
        function,
    })
}

/// Reads a LUT Descriptor / LUT Data pair from a Modality or VOI LUT Sequence item.
fn read_lut(item: &InMemDicomObject, info: &ImageInfo, name: &'static str) -> Result<Lut> {
    let descriptor = item
        .get(tags::LUT_DESCRIPTOR)
        .ok_or_else(|| VisionError::attribute(name, "item without LUT Descriptor"))?;
    let values: Vec<i64> = descriptor
        .to_multi_int()
        .map_err(|_| VisionError::attribute(name, "LUT Descriptor is not 3 integers"))?;
    let [entries, first, bits] = values[..] else {
        return Err(VisionError::attribute(
            name,
            "LUT Descriptor is not 3 integers",
        ));
    };
    let entries = if entries == 0 { 65536 } else { entries };
    // The first mapped value follows the pixel representation (PS3.3 C.11.1.1).
    let first_mapped = if info.signed && descriptor.vr() == VR::US && first > 32767 {
        first - 65536
    } else {
        first
    };
    if !(1..=16).contains(&bits) {
        return Err(VisionError::attribute(
            name,
            format!("{bits} bits per LUT entry"),
        ));
    }
    let data = lut_data(item, name)?;
    if data.len() < entries as usize {
        return Err(VisionError::attribute(
            name,
            format!(
                "LUT Data has {} entries, the descriptor says {entries}",
                data.len()
            ),
        ));
    }
    Ok(Lut {
        first_mapped,
        bits: bits as u32,
        data: data[..entries as usize].to_vec(),
    })
}

fn lut_data(item: &InMemDicomObject, name: &'static str) -> Result<Vec<u16>> {
    let element = item
        .get(tags::LUT_DATA)
        .ok_or_else(|| VisionError::attribute(name, "item without LUT Data"))?;
    words(element).ok_or_else(|| VisionError::attribute(name, "LUT Data is not 16-bit words"))
}

/// An US or OW value as 16-bit words.
fn words(element: &Element) -> Option<Vec<u16>> {
    match element.value() {
        Value::Primitive(PrimitiveValue::U16(v)) => Some(v.to_vec()),
        Value::Primitive(PrimitiveValue::U8(bytes)) => Some(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        Value::Primitive(PrimitiveValue::I16(v)) => Some(v.iter().map(|&x| x as u16).collect()),
        Value::Primitive(_) | Value::Sequence(_) | Value::PixelSequence(_) => None,
    }
}

/// PALETTE COLOR: each stored value indexes the red, green and blue palettes (PS3.3 C.7.6.3.1.5);
/// 16-bit entries are scaled to 8 bits.
fn palette(obj: &InMemDicomObject, indices: &[i64], info: &ImageInfo) -> Result<Vec<u8>> {
    let name = "Palette Color Lookup Table";
    if obj
        .get(tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA)
        .is_some()
    {
        return Err(VisionError::unsupported(
            F,
            "segmented palette color lookup tables",
        ));
    }
    let channels = [
        (
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
    ];
    let mut luts = Vec::with_capacity(3);
    for (descriptor_tag, data_tag) in channels {
        let descriptor = obj
            .get(descriptor_tag)
            .ok_or_else(|| VisionError::attribute(name, "descriptor missing"))?;
        let values: Vec<i64> = descriptor
            .to_multi_int()
            .map_err(|_| VisionError::attribute(name, "descriptor is not 3 integers"))?;
        let [entries, first, bits] = values[..] else {
            return Err(VisionError::attribute(name, "descriptor is not 3 integers"));
        };
        let entries = if entries == 0 { 65536 } else { entries };
        let first = if info.signed && descriptor.vr() == VR::US && first > 32767 {
            first - 65536
        } else {
            first
        };
        let data = obj
            .get(data_tag)
            .and_then(words)
            .ok_or_else(|| VisionError::attribute(name, "data missing or not 16-bit words"))?;
        let data: Vec<u8> = match bits {
            // 8-bit entries packed two to a word (as pydicom reads them when the data holds
            // one byte per entry).
            8 if data.len() * 2 == entries as usize => {
                data.iter().flat_map(|w| w.to_le_bytes()).collect()
            }
            8 => data.iter().map(|&v| v.min(255) as u8).collect(),
            16 => data
                .iter()
                .map(|&v| ((u32::from(v) * 255 + 32767) / 65535) as u8)
                .collect(),
            _ => {
                return Err(VisionError::attribute(
                    name,
                    format!("{bits} bits per entry"),
                ));
            }
        };
        if data.len() < entries as usize {
            return Err(VisionError::attribute(
                name,
                "fewer entries than the descriptor says",
            ));
        }
        luts.push((first, data[..entries as usize].to_vec()));
    }
    let mut rgb = Vec::with_capacity(indices.len() * 3);
    for &index in indices {
        for (first, data) in &luts {
            let i = (index - first).clamp(0, data.len() as i64 - 1) as usize;
            rgb.push(data[i]);
        }
    }
    Ok(rgb)
}

/// Color samples (interleaved or planar) to interleaved 8-bit RGB.
fn color_to_8bit(samples: &[i64], pixels: usize, planar: bool, bits_stored: u16) -> Vec<u8> {
    let max = ((1u64 << bits_stored.min(32)) - 1) as f64;
    let scale = |v: i64| -> u8 {
        if bits_stored <= 8 {
            v.clamp(0, 255) as u8
        } else {
            to_8bit(v as f64 / max)
        }
    };
    let mut out = Vec::with_capacity(pixels * 3);
    for p in 0..pixels {
        for c in 0..3 {
            let i = if planar { c * pixels + p } else { p * 3 + c };
            out.push(scale(samples[i]));
        }
    }
    out
}

/// YBR_FULL -> RGB in place, as pydicom's convert_color_space does (ITU-R BT.601 full range).
fn ybr_full_to_rgb(rgb: &mut [u8]) {
    for px in rgb.chunks_exact_mut(3) {
        let y = f32::from(px[0]);
        let cb = f32::from(px[1]) - 128.0;
        let cr = f32::from(px[2]) - 128.0;
        let r = y + 1.402 * cr;
        let g = y - (0.114 * 1.772 / 0.587) * cb - (0.299 * 1.402 / 0.587) * cr;
        let b = y + 1.772 * cb;
        for (o, v) in px.iter_mut().zip([r, g, b]) {
            *o = (v + 0.5).floor().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(modality: Modality, voi: Voi, invert: bool) -> GrayPipeline {
        GrayPipeline {
            modality,
            voi,
            invert,
        }
    }

    #[test]
    fn linear_window_matches_the_standard() {
        // PS3.3 C.11.2.1.2.1 with c = 100, w = 11: below c - 0.5 - (w-1)/2 = 94.5 -> 0,
        // above c - 0.5 + (w-1)/2 = 104.5 -> 255.
        let p = pipeline(
            Modality::Identity,
            Voi::Window {
                center: 100.0,
                width: 11.0,
                function: WindowFunction::Linear,
            },
            false,
        );
        let out = p.apply(&[90, 94, 95, 99, 100, 104, 105, 200]).unwrap();
        assert_eq!(out, vec![0, 0, 13, 115, 140, 242, 255, 255]);
        let inverted = GrayPipeline { invert: true, ..p };
        assert_eq!(inverted.apply(&[90, 200]).unwrap(), vec![255, 0]);
    }

    #[test]
    fn rescale_then_window_and_min_max() {
        let p = pipeline(
            Modality::Rescale {
                slope: 2.0,
                intercept: -1024.0,
            },
            Voi::MinMax,
            false,
        );
        assert_eq!(p.apply(&[512, 520, 532]).unwrap(), vec![0, 102, 255]);
        assert_eq!(p.apply(&[7, 7]).unwrap(), vec![0, 0]);
        let bad = pipeline(
            Modality::Identity,
            Voi::Window {
                center: 0.0,
                width: 0.5,
                function: WindowFunction::Linear,
            },
            false,
        );
        assert!(
            bad.apply(&[1])
                .unwrap_err()
                .to_string()
                .contains("Window Width")
        );
    }

    #[test]
    fn voi_lut_clamps_to_its_ends() {
        let lut = Lut {
            first_mapped: 10,
            bits: 8,
            data: vec![0, 100, 255],
        };
        let p = pipeline(Modality::Identity, Voi::Lut(lut), false);
        assert_eq!(
            p.apply(&[-5, 10, 11, 12, 5000]).unwrap(),
            vec![0, 0, 100, 255, 255]
        );
    }

    #[test]
    fn stored_values_masks_and_sign_extends() {
        let info = ImageInfo {
            rows: 1,
            cols: 2,
            samples_per_pixel: 1,
            bits_allocated: 16,
            bits_stored: 12,
            signed: true,
            photometric: Photometric::Monochrome2,
            frames: 1,
        };
        let mut data = Vec::new();
        data.extend_from_slice(&0xF800u16.to_ne_bytes()); // overlay bits + 0x800 = -2048
        data.extend_from_slice(&0x07FFu16.to_ne_bytes());
        assert_eq!(stored_values(&data, &info), vec![-2048, 2047]);
        let unsigned = ImageInfo {
            signed: false,
            ..info
        };
        assert_eq!(stored_values(&data, &unsigned), vec![0x800, 0x7FF]);
    }

    #[test]
    fn ybr_gray_stays_gray() {
        let mut px = [77u8, 128, 128];
        ybr_full_to_rgb(&mut px);
        assert_eq!(px, [77, 77, 77]);
    }
}
