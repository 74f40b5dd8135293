//! Re-lays quantized weights for candle's CPU kernels without changing the numerics.
//!
//! llama.cpp's Q4_K_M files store many matrices as Q5_0 (and Q4_0), for which candle has no SIMD
//! kernel: a Q5_0 matmul is ~10x slower than the same matrix in Q8_0. Q4_0 and Q5_0 blocks
//! convert to Q8_0 exactly (same scale, integer shift: no rounding), and both types multiply
//! against activations quantized to Q8_0 in blocks of 32, so the result is unchanged.
//!
//! We deliberately do NOT zero-pad k to a multiple of 256 to reach candle's repacked kernels:
//! those quantize activations in blocks of 256 (Q8_K), which moved the demo model's perplexity
//! 1.8% away from the dequantized model (vs 0.2% with blocks of 32). Widths that candle runs
//! slowly go to our own kernel instead (`cpu_gemv`).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};

use crate::error::Result;

const QK: usize = 32;
const Q8_0_BYTES: usize = 34;
const Q5_0_BYTES: usize = 22;
const Q4_0_BYTES: usize = 18;

/// A quantized matrix `[n, k]` relaid for the CPU (same shape): Q4_0 and Q5_0 become Q8_0,
/// anything else is returned as it is.
pub(crate) fn relayout(q: Arc<QTensor>, device: &Device) -> Result<Arc<QTensor>> {
    let (n, k) = q.shape().dims2()?;
    if !device.is_cpu() {
        return Ok(q);
    }
    let dt = q.dtype();
    let convertible = matches!(dt, GgmlDType::Q4_0 | GgmlDType::Q5_0);
    if !convertible || !k.is_multiple_of(QK) {
        return Ok(q);
    }
    let blocks = k / QK;
    let data = q.data()?;
    let in_bytes = match dt {
        GgmlDType::Q4_0 => Q4_0_BYTES,
        GgmlDType::Q5_0 => Q5_0_BYTES,
        _ => Q8_0_BYTES,
    };
    let mut out = vec![0u8; n * blocks * Q8_0_BYTES];
    for r in 0..n {
        for b in 0..blocks {
            let src = &data[(r * blocks + b) * in_bytes..][..in_bytes];
            let dst = &mut out[(r * blocks + b) * Q8_0_BYTES..][..Q8_0_BYTES];
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
    }
    let storage = QStorage::from_data(Cow::Owned(out), device, GgmlDType::Q8_0)?;
    Ok(Arc::new(QTensor::new(storage, (n, k))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Module, Tensor};

    #[test]
    fn conversion_is_exact() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (16, 640), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (300, 640), &dev)?;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q5_0] {
            let q = Arc::new(QTensor::quantize(&w, dt)?);
            let r = relayout(q.clone(), &dev)?;
            assert_eq!(r.shape().dims2()?, (16, 640));
            assert_eq!(r.dtype(), GgmlDType::Q8_0);
            let a = q.dequantize(&dev)?;
            let b = r.dequantize(&dev)?;
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dt:?} conversion changed values");
            // Same activation quantization (Q8_0) on both sides: the same products.
            let y0 = candle_core::quantized::QMatMul::from_arc(q)?.forward(&x)?;
            let y1 = candle_core::quantized::QMatMul::from_arc(r)?.forward(&x)?;
            let d = (y0 - y1)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-3, "{dt:?}: products differ by {d}");
        }
        Ok(())
    }

    #[test]
    fn other_types_are_untouched() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 512), &dev)?;
        for dt in [GgmlDType::Q4K, GgmlDType::Q8_0, GgmlDType::Q6K] {
            let q = Arc::new(QTensor::quantize(&w, dt)?);
            let r = relayout(q.clone(), &dev)?;
            assert!(Arc::ptr_eq(&q, &r));
            assert_eq!(r.shape().dims2()?, (8, 512));
        }
        Ok(())
    }
}
