//! Re-lays quantized weights so candle's fast CPU kernels apply to every matrix.
//!
//! candle's repacked x86 kernels (AVX-512 VNNI / AMX) need the reduction dimension k to be a
//! multiple of 256 and the type to be Q4_K, Q6_K or Q8_0; anything else falls back to a generic
//! dot-product loop that is 10-40x slower (Q5_0 has no SIMD kernel at all). Gemma 3 270M has
//! k = 640, and llama.cpp's Q4_K_M files store many matrices as Q5_0. So on CPU we:
//! - convert Q4_0 / Q5_0 / Q8_0 blocks to Q8_0 exactly (same scale, integer shift: no rounding),
//! - zero-pad each row to the next multiple of 256 (zero blocks add nothing to a dot product),
//! and pad the activations with zeros to match. Other types are left as they are.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::error::Result;

const QK: usize = 32;
const Q8_0_BYTES: usize = 34;
const Q5_0_BYTES: usize = 22;
const Q4_0_BYTES: usize = 18;
const ALIGN: usize = 256;

/// A quantized matrix `[n, k]` relaid for the CPU: the tensor (maybe `[n, k_padded]`) and the
/// padded k the activations must be widened to.
pub(crate) fn relayout(q: Arc<QTensor>, device: &Device) -> Result<(Arc<QTensor>, usize)> {
    let (n, k) = q.shape().dims2()?;
    if !device.is_cpu() {
        return Ok((q, k));
    }
    let dt = q.dtype();
    let fast_type = matches!(dt, GgmlDType::Q4K | GgmlDType::Q6K | GgmlDType::Q8_0);
    if fast_type && k.is_multiple_of(ALIGN) {
        return Ok((q, k));
    }
    let convertible = matches!(dt, GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0);
    if !convertible || !k.is_multiple_of(QK) {
        return Ok((q, k));
    }
    let kp = k.div_ceil(ALIGN) * ALIGN;
    let blocks_in = k / QK;
    let blocks_out = kp / QK;
    let data = q.data()?;
    let in_bytes = match dt {
        GgmlDType::Q4_0 => Q4_0_BYTES,
        GgmlDType::Q5_0 => Q5_0_BYTES,
        _ => Q8_0_BYTES,
    };
    let mut out = vec![0u8; n * blocks_out * Q8_0_BYTES];
    for r in 0..n {
        for b in 0..blocks_in {
            let src = &data[(r * blocks_in + b) * in_bytes..][..in_bytes];
            let dst = &mut out[(r * blocks_out + b) * Q8_0_BYTES..][..Q8_0_BYTES];
            // The f16 scale is the first two bytes in all three formats.
            dst[..2].copy_from_slice(&src[..2]);
            let q8 = &mut dst[2..];
            match dt {
                GgmlDType::Q4_0 => {
                    let qs = &src[2..18];
                    for j in 0..16 {
                        q8[j] = ((qs[j] & 0x0F) as i8 - 8) as u8;
                        q8[j + 16] = ((qs[j] >> 4) as i8 - 8) as u8;
                    }
                }
                GgmlDType::Q5_0 => {
                    let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                    let qs = &src[6..22];
                    for j in 0..16 {
                        let h0 = (((qh >> j) << 4) & 0x10) as u8;
                        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                        q8[j] = (((qs[j] & 0x0F) | h0) as i8 - 16) as u8;
                        q8[j + 16] = (((qs[j] >> 4) | h1) as i8 - 16) as u8;
                    }
                }
                _ => q8.copy_from_slice(&src[2..34]),
            }
        }
        // Padding blocks stay all-zero: scale 0, values 0.
    }
    let storage = QStorage::from_data(Cow::Owned(out), device, GgmlDType::Q8_0)?;
    Ok((Arc::new(QTensor::new(storage, (n, kp))?), kp))
}

/// Widens `x [m, k]` with zero columns to `[m, kp]`.
pub(crate) fn pad_cols(x: &Tensor, kp: usize) -> candle_core::Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    if k == kp {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = kp - k;
    let z = Tensor::zeros(dims, x.dtype(), x.device())?;
    Tensor::cat(&[x, &z], candle_core::D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_is_exact_and_padding_is_inert() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (16, 640), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 640), &dev)?;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let q = Arc::new(QTensor::quantize(&w, dt)?);
            let (r, kp) = relayout(q.clone(), &dev)?;
            assert_eq!(kp, 768);
            assert_eq!(r.dtype(), GgmlDType::Q8_0);
            let a = q.dequantize(&dev)?;
            let b = r.dequantize(&dev)?;
            let diff = (a - b.narrow(1, 0, 640)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dt:?} conversion changed values");
            let pad = b
                .narrow(1, 640, 128)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(pad, 0.0);
            let _ = pad_cols(&x, kp)?;
        }
        Ok(())
    }

    #[test]
    fn aligned_fast_types_are_untouched() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 512), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4K)?);
        let (r, kp) = relayout(q.clone(), &dev)?;
        assert!(Arc::ptr_eq(&q, &r));
        assert_eq!(kp, 512);
        Ok(())
    }
}
