//! RGB image -> SigLIP pixel values, as transformers' `Gemma3ImageProcessor` computes them with
//! its PIL backend (the reference; its torchvision backend resizes differently).
//!
//! - [`resize_bilinear_pil`] is Pillow's `Image.resize(size, BILINEAR)` on 8-bit RGB, bit for
//!   bit: a separable triangle filter whose support grows with the downscale factor
//!   (antialiased, not plain bilinear sampling), coefficients in 22-bit fixed point, horizontal
//!   pass then vertical pass, each rounded and clipped to 8 bits (Pillow's
//!   `src/libImaging/Resample.c`).
//! - [`to_pixel_values`]: resize to `size` x `size` (aspect not kept), x / 255,
//!   (x - 0.5) / 0.5, channels first.
//! - [`pan_and_scan`]: the extra crops for images with an exaggerated aspect ratio, with
//!   transformers' rules (activation ratio, crop count from the aspect ratio, minimum crop
//!   size).

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::{Result, VisionError};

/// Pillow's fixed-point precision for 8-bit resampling: 32 - 8 - 2.
const PRECISION_BITS: u32 = 22;

/// Pan-and-scan settings, named as in transformers' `Gemma3ImageProcessor`
/// (`pan_and_scan_min_crop_size`, `pan_and_scan_max_num_crops`,
/// `pan_and_scan_min_ratio_to_activate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PanAndScanConfig {
    /// Crops smaller than this (in pixels, on either side) are not made.
    pub min_crop_size: u32,
    /// At most this many crops (at least 2 are made when active).
    pub max_num_crops: u32,
    /// Pan-and-scan only runs when long side / short side is at least this.
    pub min_ratio_to_activate: f64,
}

impl Default for PanAndScanConfig {
    /// Gemma 3's published preprocessor settings: 256, 4, 1.2.
    fn default() -> Self {
        Self {
            min_crop_size: 256,
            max_num_crops: 4,
            min_ratio_to_activate: 1.2,
        }
    }
}

/// A crop of the source image, in source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Settings for [`preprocess`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessConfig {
    /// Side of the square the vision tower takes (896 for MedGemma / Gemma 3).
    pub image_size: u32,
    /// Pan-and-scan, off (`None`) by default as in Gemma 3's processor.
    pub pan_and_scan: Option<PanAndScanConfig>,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            image_size: 896,
            pan_and_scan: None,
        }
    }
}

/// Resizes 8-bit RGB exactly as Pillow's `Image.resize((width, height), Image.BILINEAR)`.
///
/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width does (`ImagingResampleInner`), the horizontal pass first otherwise; the
/// order changes the intermediate rounding, so it is reproduced. (Pillow 12 and older always
/// ran the horizontal pass first: against them a few pixels differ by one level.)
pub fn resize_bilinear_pil(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(VisionError::InvalidArgument(format!(
            "cannot resize to {width}x{height}"
        )));
    }
    let (in_w, in_h) = img.dimensions();
    if in_w == 0 || in_h == 0 {
        return Err(VisionError::InvalidArgument(format!(
            "cannot resize an empty {in_w}x{in_h} image"
        )));
    }
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    if !need_horizontal && !need_vertical {
        return Ok(img.clone());
    }
    let (in_w_us, in_h_us) = (in_w as usize, in_h as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let shrink_h = i64::from(in_h) - i64::from(height);
    let shrink_w = i64::from(in_w) - i64::from(width);
    let vertical_first = shrink_h > 0 && shrink_h > shrink_w * 2;
    let src = img.as_raw().as_slice();

    let out = if vertical_first {
        let vertical = Coefficients::new(in_h, height);
        let temp = vertical_pass(src, in_w_us, &vertical, 0);
        if need_horizontal {
            horizontal_pass(&temp, in_w_us, 0..out_h, &Coefficients::new(in_w, width))
        } else {
            temp
        }
    } else {
        let vertical = Coefficients::new(in_h, height);
        if need_horizontal {
            // Only the rows the vertical pass reads (Pillow's ybox_first..ybox_last).
            let first = vertical.bounds[0].0;
            let (last_start, last_count) = vertical.bounds[out_h - 1];
            let rows = first..(last_start + last_count).min(in_h_us);
            let temp = horizontal_pass(src, in_w_us, rows, &Coefficients::new(in_w, width));
            if need_vertical {
                vertical_pass(&temp, out_w, &vertical, first)
            } else {
                temp
            }
        } else {
            vertical_pass(src, in_w_us, &vertical, 0)
        }
    };
    RgbImage::from_raw(width, height, out)
        .ok_or_else(|| VisionError::InvalidArgument("resize buffer size".into()))
}

/// Pillow's `ImagingResampleHorizontal_8bpc` on the rows `rows` of an RGB image `src_w` wide.
fn horizontal_pass(
    src: &[u8],
    src_w: usize,
    rows: std::ops::Range<usize>,
    coeffs: &Coefficients,
) -> Vec<u8> {
    let out_w = coeffs.bounds.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for (out_row, y) in out.chunks_exact_mut(out_w * 3).zip(rows) {
        let in_row = &src[y * src_w * 3..(y + 1) * src_w * 3];
        for (xx, out_px) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, count) = coeffs.bounds[xx];
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &k) in coeffs.row(xx).iter().take(count).enumerate() {
                let p = &in_row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for c in 0..3 {
                    acc[c] += i32::from(p[c]) * k;
                }
            }
            for c in 0..3 {
                out_px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Pillow's `ImagingResampleVertical_8bpc`: `src` is `width` wide and starts at source row
/// `row_offset`.
fn vertical_pass(src: &[u8], width: usize, coeffs: &Coefficients, row_offset: usize) -> Vec<u8> {
    let stride = width * 3;
    let out_h = coeffs.bounds.len();
    let mut out = vec![0u8; out_h * stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, count) = coeffs.bounds[yy];
        let ymin = ymin - row_offset;
        let k = &coeffs.row(yy)[..count];
        for (i, out_sample) in out_row.iter_mut().enumerate() {
            let mut acc = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                acc += i32::from(src[(ymin + y) * stride + i]) * ky;
            }
            *out_sample = clip8(acc);
        }
    }
    out
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `precompute_coeffs` for the bilinear (triangle) filter, then
/// `normalize_coeffs_8bpc`.
struct Coefficients {
    ksize: usize,
    /// Per output index: first input index and number of inputs.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point coefficients per output index.
    k: Vec<i32>,
}

impl Coefficients {
    fn new(in_size: u32, out_size: u32) -> Self {
        const SUPPORT: f64 = 1.0;
        // Pillow computes (in1 - in0) in float, then divides in double.
        let scale = f64::from(in_size as f32) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let out = out_size as usize;
        let mut bounds = Vec::with_capacity(out);
        let mut k = vec![0i32; out * ksize];
        let mut weights = vec![0f64; ksize];
        for xx in 0..out {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) - xmin;
            let count = xmax.clamp(0, ksize as i64) as usize;
            let xmin = xmin as usize;
            let mut ww = 0.0;
            for (x, w) in weights.iter_mut().enumerate().take(count) {
                *w = triangle(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *w;
            }
            let row = &mut k[xx * ksize..(xx + 1) * ksize];
            for (kx, w) in row.iter_mut().zip(weights.iter()).take(count) {
                let w = if ww != 0.0 { w / ww } else { *w };
                *kx = if w < 0.0 {
                    (-0.5 + w * f64::from(1u32 << PRECISION_BITS)) as i32
                } else {
                    (0.5 + w * f64::from(1u32 << PRECISION_BITS)) as i32
                };
            }
            bounds.push((xmin, count));
        }
        Self { ksize, bounds, k }
    }

    fn row(&self, i: usize) -> &[i32] {
        &self.k[i * self.ksize..(i + 1) * self.ksize]
    }
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Resize to `size` x `size` with [`resize_bilinear_pil`], then x / 255, (x - 0.5) / 0.5, as a
/// `[3, size, size]` f32 tensor on the CPU, in the float steps transformers takes (rescale in
/// f64, cast to f32, normalize in f32).
pub fn to_pixel_values(img: &RgbImage, size: u32) -> Result<Tensor> {
    let resized = resize_bilinear_pil(img, size, size)?;
    let plane = (size as usize) * (size as usize);
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in resized.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = (f64::from(px[c]) * (1.0 / 255.0)) as f32;
            chw[c * plane + i] = (x - 0.5) / 0.5;
        }
    }
    Ok(Tensor::from_vec(
        chw,
        (3, size as usize, size as usize),
        &Device::Cpu,
    )?)
}

/// The pan-and-scan crops of a `width` x `height` image, in transformers' order (row-major);
/// empty when pan-and-scan does not activate.
pub fn pan_and_scan_boxes(width: u32, height: u32, cfg: &PanAndScanConfig) -> Vec<CropBox> {
    if width == 0 || height == 0 || cfg.max_num_crops == 0 {
        return Vec::new();
    }
    let (w, h) = (f64::from(width), f64::from(height));
    let crops_along = |long: f64, short: f64| -> u32 {
        // Half-up rounding of the aspect ratio, no more crops than fit min_crop_size, then
        // clamped to [2, max_num_crops] (max applied last, as transformers does).
        let mut n = (long / short + 0.5).floor() as u32;
        if cfg.min_crop_size > 0 {
            n = n.min((long / f64::from(cfg.min_crop_size)).floor() as u32);
        }
        n.max(2).min(cfg.max_num_crops)
    };
    let (num_w, num_h) = if width >= height {
        if w / h < cfg.min_ratio_to_activate {
            return Vec::new();
        }
        (crops_along(w, h), 1)
    } else {
        if h / w < cfg.min_ratio_to_activate {
            return Vec::new();
        }
        (1, crops_along(h, w))
    };
    let crop_w = width.div_ceil(num_w);
    let crop_h = height.div_ceil(num_h);
    if crop_w.min(crop_h) < cfg.min_crop_size {
        return Vec::new();
    }
    let mut boxes = Vec::with_capacity((num_w * num_h) as usize);
    for i in 0..num_h {
        for j in 0..num_w {
            let (x, y) = (crop_w * j, crop_h * i);
            // numpy slicing clips the last crop at the image edge.
            let bw = crop_w.min(width.saturating_sub(x));
            let bh = crop_h.min(height.saturating_sub(y));
            if bw > 0 && bh > 0 {
                boxes.push(CropBox {
                    x,
                    y,
                    width: bw,
                    height: bh,
                });
            }
        }
    }
    boxes
}

/// The pan-and-scan crops of `img` (see [`pan_and_scan_boxes`]).
pub fn pan_and_scan(img: &RgbImage, cfg: &PanAndScanConfig) -> Vec<RgbImage> {
    pan_and_scan_boxes(img.width(), img.height(), cfg)
        .into_iter()
        .map(|b| image::imageops::crop_imm(img, b.x, b.y, b.width, b.height).to_image())
        .collect()
}

/// The whole Gemma 3 image preprocessing of one image: the image itself, then its pan-and-scan
/// crops when enabled, each through [`to_pixel_values`], stacked as
/// `[1 + crops, 3, size, size]` f32 on the CPU (transformers' `pixel_values` order; its
/// `num_crops` is the first dimension minus one).
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<Tensor> {
    let mut views = vec![to_pixel_values(img, cfg.image_size)?];
    if let Some(pas) = &cfg.pan_and_scan {
        for crop in pan_and_scan(img, pas) {
            views.push(to_pixel_values(&crop, cfg.image_size)?);
        }
    }
    Ok(Tensor::stack(&views, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant_images() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        assert_eq!(resize_bilinear_pil(&img, 7, 5).unwrap(), img);
        let flat = RgbImage::from_pixel(13, 9, image::Rgb([200, 17, 0]));
        let out = resize_bilinear_pil(&flat, 4, 20).unwrap();
        assert!(out.pixels().all(|p| p.0 == [200, 17, 0]));
        assert!(resize_bilinear_pil(&flat, 0, 3).is_err());
    }

    #[test]
    fn pan_and_scan_rules() {
        let cfg = PanAndScanConfig::default();
        // Below the activation ratio.
        assert!(pan_and_scan_boxes(1100, 1000, &cfg).is_empty());
        // 1955 wide, 1000 high: ratio 1.955 -> 2 crops of 978.
        let b = pan_and_scan_boxes(1955, 1000, &cfg);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[1],
            CropBox {
                x: 978,
                y: 0,
                width: 977,
                height: 1000
            }
        );
        // Portrait 300 x 1000: 3 crops by ratio, floor(1000/256) = 3, crop 334 high.
        let b = pan_and_scan_boxes(300, 1000, &cfg);
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[2],
            CropBox {
                x: 0,
                y: 668,
                width: 300,
                height: 332
            }
        );
        // Crops would be narrower than 256.
        assert!(pan_and_scan_boxes(400, 100, &cfg).is_empty());
        // Very wide: capped at 4.
        assert_eq!(pan_and_scan_boxes(5000, 600, &cfg).len(), 4);
    }
}
