//! CPU f32 kernels where candle's generic ones cost the most: softmax over the vision tower's
//! 4096-wide score rows, the tanh GELU of both MLPs (candle calls scalar `expf`/`tanhf`, and
//! its unary maps run on one thread: at 16 decoding sequences the text MLP's GELU was a tenth
//! of a step), bias and residual adds.
//!
//! Each uses a polynomial `exp` (Cephes' `expf`, within 2 ulp) written so the compiler
//! vectorises it; on x86-64 the same code is compiled again for AVX-512 and AVX2 and picked at
//! run time (`dispatch!`, which the decode attention uses too). The vision tower's ops run
//! rows on rayon; the text model's on candle's CPU worker pool (`pool_chunks_mut`), the
//! threads every other candle kernel of that model runs on. Only f32 CPU tensors take these
//! paths; everything else (bf16, CUDA) uses candle's own ops.

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

const LANES: usize = 16;

// Cephes' expf: e^x = 2^n e^r with |r| <= ln2/2, ln2 split in two for an exact `n ln2`, and
// e^r = 1 + r + r^2 P(r), P of degree 5 (highest coefficient first). The fused attention's
// AVX-512 exp uses the same constants.
pub const LOG2E: f32 = std::f32::consts::LOG2_E;
pub const LN2_HI: f32 = 0.693_359_4;
pub const LN2_LO: f32 = -2.121_944_4e-4;
pub const EXP_POLY: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// The range `exp_approx` clamps its argument to.
pub const EXP_LO: f32 = -87.0;
pub const EXP_HI: f32 = 88.0;

/// `e^x` for `x` in roughly [-87, 88] (clamped there), Cephes' polynomial.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(EXP_LO, EXP_HI);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &k| p * r + k);
    let p = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits(((ni + 127) << 23) as u32)
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, tanh via exp.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2 / pi)
    let u = K * (x + 0.044_715 * x * x * x);
    let th = 1.0 - 2.0 / (1.0 + exp_approx(2.0 * u));
    0.5 * x * (1.0 + th)
}

#[inline(always)]
fn softmax_row_generic(row: &mut [f32], scale: f32) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for v in m {
        max = max.max(v);
    }
    // Two sums, so the adds of consecutive vectors do not wait on each other.
    let mut s0 = [0f32; LANES];
    let mut s1 = [0f32; LANES];
    let mut pairs = row.chunks_exact_mut(2 * LANES);
    for c in &mut pairs {
        for i in 0..LANES {
            let e = exp_approx((c[i] - max) * scale);
            c[i] = e;
            s0[i] += e;
            let e = exp_approx((c[LANES + i] - max) * scale);
            c[LANES + i] = e;
            s1[i] += e;
        }
    }
    let mut sum: f32 = s0.iter().zip(&s1).map(|(a, b)| a + b).sum();
    for c in pairs.into_remainder() {
        let e = exp_approx((*c - max) * scale);
        *c = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for d in row.iter_mut() {
        *d *= inv;
    }
}

#[inline(always)]
fn bias_act_row_generic(row: &mut [f32], bias: &[f32], gelu: bool) {
    if gelu {
        for (d, &b) in row.iter_mut().zip(bias) {
            *d = gelu_tanh(*d + b);
        }
    } else {
        for (d, &b) in row.iter_mut().zip(bias) {
            *d += b;
        }
    }
}

#[inline(always)]
fn gelu_mul_row_generic(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = gelu_tanh(g) * u;
    }
}

#[inline(always)]
fn add_generic(dst: &mut [f32], b: &[f32]) {
    for (d, &y) in dst.iter_mut().zip(b) {
        *d += y;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Generic,
}

/// The widest of our SIMD builds this CPU runs (`MEDGEMMA_CPU_SIMD=0`: the portable one).
pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var_os("MEDGEMMA_CPU_SIMD").is_some_and(|v| v == "0") {
                Isa::Generic
            } else if is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Generic
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Generic
}

/// `fn $name(args) -> ret`: runs `$generic(args)` compiled for AVX-512 or AVX2 when the CPU
/// has it (`isa()`), else the portable build of the same code.
macro_rules! dispatch {
    ($vis:vis $name:ident => $generic:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[allow(unsafe_code)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::cpu_ops::{Isa, isa};
                #[target_feature(enable = "avx512f,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                match isa() {
                    // SAFETY: `isa()` checked the CPU for these features.
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Generic => {}
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use dispatch;

dispatch!(softmax_row => softmax_row_generic(row: &mut [f32], scale: f32));
dispatch!(bias_act_row => bias_act_row_generic(row: &mut [f32], bias: &[f32], gelu: bool));
dispatch!(add_slice => add_generic(dst: &mut [f32], b: &[f32]));
dispatch!(gelu_mul_row => gelu_mul_row_generic(out: &mut [f32], gate: &[f32], up: &[f32]));

/// `f(i, chunk)` for the `chunk`-long pieces of `data` (the last may be shorter), spread over
/// candle's CPU worker pool (the caller's thread included).
pub(crate) fn pool_chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let parts: Vec<std::sync::Mutex<&mut [T]>> = data
        .chunks_mut(chunk.max(1))
        .map(std::sync::Mutex::new)
        .collect();
    // Each piece is locked by the one task that owns its index: never contended.
    candle_core::utils::barrier_pool().execute_chunked(parts.len(), |range| {
        for i in range {
            let mut part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
            f(i, &mut part);
        }
    });
}

pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: contiguous input only"),
    }
}

fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{what}: contiguous input only"),
    }
}

/// Rows processed per task (large enough to amortise scheduling).
fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

struct Softmax {
    scale: f32,
}

impl InplaceOp1 for Softmax {
    fn name(&self) -> &'static str {
        "medgemma-softmax-last-dim"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let x = f32_slice_mut(s, l, "softmax")?;
        x.par_chunks_mut(rows_per_task(cols) * cols).for_each(|c| {
            for row in c.chunks_exact_mut(cols) {
                softmax_row(row, self.scale);
            }
        });
        Ok(())
    }
}

struct BiasAct {
    gelu: bool,
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        if self.gelu {
            "medgemma-bias-gelu"
        } else {
            "medgemma-bias-add"
        }
    }
    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let bias = f32_slice(bs, bl, "bias_act bias")?;
        let cols = bias.len().max(1);
        if l.dims().last() != Some(&cols) {
            candle_core::bail!("bias of {cols} for rows of {:?}", l.dims())
        }
        let x = f32_slice_mut(s, l, "bias_act")?;
        x.par_chunks_mut(rows_per_task(cols) * cols).for_each(|c| {
            for row in c.chunks_exact_mut(cols) {
                bias_act_row(row, bias, self.gelu);
            }
        });
        Ok(())
    }
}

struct Add;

impl InplaceOp2 for Add {
    fn name(&self) -> &'static str {
        "medgemma-add"
    }
    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let b = f32_slice(bs, bl, "add rhs")?;
        let a = f32_slice_mut(s, l, "add")?;
        if b.is_empty() || !a.len().is_multiple_of(b.len()) {
            candle_core::bail!("add of {} and {} elements", a.len(), b.len())
        }
        // `b` is added to each block of `a` of its length (one block: plain `a + b`).
        for block in a.chunks_exact_mut(b.len()) {
            block
                .par_chunks_mut(16_384)
                .zip(b.par_chunks(16_384))
                .for_each(|(d, y)| add_slice(d, y));
        }
        Ok(())
    }
}

/// `gelu_tanh(gate) * up` into a new `[rows, cols]` f32 tensor, reading `gate` and `up` where
/// they lie (each may be a column slice of a wider matrix: the fused gate/up projection's
/// halves).
struct GeluMul;

/// `(row stride, rows, cols)` of a 2-D layout whose rows are contiguous (a column slice of
/// a wider matrix included); `None` for any other layout.
fn row_layout(l: &Layout) -> Option<(usize, usize, usize)> {
    match (l.dims(), l.stride()) {
        (&[rows, cols], &[rs, 1]) if rows <= 1 || rs >= cols => Some((rs, rows, cols)),
        _ => None,
    }
}

/// `(data, first element, row stride, rows, cols)` of a 2-D f32 view (`row_layout`).
fn rows_view<'a>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<(&'a [f32], usize, usize, usize, usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("gelu_mul: f32 only")
    };
    match row_layout(l) {
        Some((rs, rows, cols)) => Ok((v, l.start_offset(), rs, rows, cols)),
        None => candle_core::bail!("gelu_mul: 2-D rows with unit column stride only"),
    }
}

impl candle_core::CustomOp2 for GeluMul {
    fn name(&self) -> &'static str {
        "medgemma-gelu-mul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let (g, go, gs, rows, cols) = rows_view(s1, l1)?;
        let (u, uo, us, urows, ucols) = rows_view(s2, l2)?;
        if (rows, cols) != (urows, ucols) {
            candle_core::bail!("gelu_mul of {:?} and {:?}", l1.dims(), l2.dims())
        }
        let mut out = vec![0f32; rows * cols];
        let per = rows_per_task(cols);
        // No columns: `out` is empty and no piece runs.
        pool_chunks_mut(&mut out, per * cols, |c, part| {
            for (i, o) in part.chunks_exact_mut(cols).enumerate() {
                let r = c * per + i;
                gelu_mul_row(o, &g[go + r * gs..][..cols], &u[uo + r * us..][..cols]);
            }
        });
        Ok((CpuStorage::F32(out), (rows, cols).into()))
    }
}

/// `gelu_tanh(gate) * up` for `[rows, cols]` tensors; our kernel for f32 on the CPU (either
/// may be a column slice of a wider matrix), candle's ops otherwise.
pub fn gelu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let ok = |t: &Tensor| {
        t.device().is_cpu() && t.dtype() == DType::F32 && row_layout(t.layout()).is_some()
    };
    if ok(gate) && ok(up) && gate.dims() == up.dims() {
        gate.apply_op2_no_bwd(up, &GeluMul)
    } else {
        gate.gelu()? * up
    }
}

fn fast(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// `softmax(scale * x)` over the last dimension, in f32. Takes `x` by value: on the CPU fast
/// path it is overwritten (callers pass a fresh matmul output nobody else holds).
pub fn softmax_last_dim(x: Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if fast(&x) {
        x.inplace_op1(&Softmax {
            scale: scale as f32,
        })?;
        Ok(x)
    } else {
        candle_nn::ops::softmax_last_dim(&(x.to_dtype(DType::F32)? * scale)?)
    }
}

/// `x + bias` (bias broadcast over rows), then the tanh GELU when `gelu`; in place on the CPU
/// fast path.
pub fn bias_act(x: Tensor, bias: &Tensor, gelu: bool) -> candle_core::Result<Tensor> {
    if fast(&x) && fast(bias) {
        x.inplace_op2(bias, &BiasAct { gelu })?;
        Ok(x)
    } else {
        let y = x.broadcast_add(bias)?;
        if gelu { y.gelu() } else { Ok(y) }
    }
}

/// `a + b`, same shapes; in place on `a` on the CPU fast path.
pub fn add(a: Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fast(&a) && fast(b) && a.dims() == b.dims() {
        a.inplace_op2(b, &Add)?;
        Ok(a)
    } else {
        a.add(b)
    }
}

/// `a + b` where `a` is `b` stacked `k` times along the first dimension (`a` `[k * r, ...]`,
/// `b` `[r, ...]`): `b` added to each block of `a`, as `k` separate adds would; in place on `a`
/// on the CPU fast path.
pub fn add_tiled(a: Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dims() == b.dims() {
        return add(a, b);
    }
    let (rows, rest) = (a.dim(0)?, &a.dims()[1..]);
    let r = b.dim(0)?;
    if r == 0 || !rows.is_multiple_of(r) || rest != &b.dims()[1..] {
        candle_core::bail!("add_tiled of {:?} and {:?}", a.dims(), b.dims())
    }
    if fast(&a) && fast(b) {
        a.inplace_op2(b, &Add)?;
        return Ok(a);
    }
    let mut tiled = vec![rows / r];
    tiled.extend_from_slice(b.dims());
    a.reshape(tiled)?.broadcast_add(b)?.reshape(a.dims())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use medgemma_test_support::max_abs_diff;

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1e-30))
            .fold(0.0, f32::max)
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        let xs: Vec<f32> = (-8700..8800).map(|i| i as f32 * 0.01 + 0.003).collect();
        let got: Vec<f32> = xs.iter().map(|&x| exp_approx(x)).collect();
        let want: Vec<f32> = xs.iter().map(|&x| x.exp()).collect();
        assert!(max_rel(&got, &want) < 5e-7, "{}", max_rel(&got, &want));
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-1e4) < 1e-37 && exp_approx(1e4).is_finite());
    }

    #[test]
    fn kernels_match_candle() {
        let d = Device::Cpu;
        // 37 columns: exercises the 16-lane remainder.
        let x = (Tensor::randn(0f32, 3.0, (9, 37), &d).unwrap())
            .contiguous()
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, 37, &d).unwrap();
        let diff = |a: Tensor, b: Tensor| max_abs_diff(&a, &b);
        let fresh = || x.copy().unwrap();
        let got = softmax_last_dim(fresh(), 0.3).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&(&x * 0.3).unwrap()).unwrap();
        assert!(diff(got, want) < 1e-6);
        let got = bias_act(fresh(), &b, true).unwrap();
        let want = x.broadcast_add(&b).unwrap().gelu().unwrap();
        assert!(diff(got, want) < 2e-6);
        let got = bias_act(fresh(), &b, false).unwrap();
        assert_eq!(diff(got, x.broadcast_add(&b).unwrap()), 0.0);
        let got = add(fresh(), &x).unwrap();
        assert_eq!(diff(got, (&x + &x).unwrap()), 0.0);
        // The caller's tensor is untouched when it was not handed over.
        assert_eq!(diff(fresh(), x.clone()), 0.0);
        // Extreme inputs: no NaN, saturated GELU.
        let big = Tensor::new(&[[-1e4f32, 1e4, 0.0, -30.0, 30.0]], &d).unwrap();
        let z = Tensor::zeros(5, DType::F32, &d).unwrap();
        let g: Vec<f32> = bias_act(big.copy().unwrap(), &z, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g[0], 0.0);
        assert_eq!(g[1], 1e4);
        assert!(g.iter().all(|v| v.is_finite()));
        let s: Vec<f32> = softmax_last_dim(big, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((s[1] - 1.0).abs() < 1e-6 && s.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn gelu_mul_reads_the_halves_of_a_fused_projection() {
        let d = Device::Cpu;
        // 37 columns per half: exercises the 16-lane remainder; 70 rows span several pieces.
        let y = Tensor::randn(0f32, 3.0, (70, 74), &d).unwrap();
        let (g, u) = (y.narrow(1, 0, 37).unwrap(), y.narrow(1, 37, 37).unwrap());
        assert!(!g.is_contiguous());
        let want = (g.gelu().unwrap() * &u).unwrap();
        assert!(max_abs_diff(&gelu_mul(&g, &u).unwrap(), &want) < 1e-5);
        // Separate contiguous tensors, one row, and a non-f32 input (candle's path) agree.
        let (gc, uc) = (g.contiguous().unwrap(), u.contiguous().unwrap());
        assert!(max_abs_diff(&gelu_mul(&gc, &uc).unwrap(), &want) < 1e-5);
        let (g1, u1) = (gc.narrow(0, 3, 1).unwrap(), uc.narrow(0, 3, 1).unwrap());
        let want1 = want.narrow(0, 3, 1).unwrap();
        assert!(max_abs_diff(&gelu_mul(&g1, &u1).unwrap(), &want1) < 1e-5);
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = gelu_mul(&bf(&gc), &bf(&uc)).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        // Shapes that differ are refused.
        assert!(gelu_mul(&gc, &uc.narrow(0, 0, 5).unwrap()).is_err());
    }

    #[test]
    fn tiled_add_adds_the_block_to_every_block() {
        let d = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (3 * 5, 37), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, (5, 37), &d).unwrap();
        let want = a
            .reshape((3, 5, 37))
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .reshape((15, 37))
            .unwrap();
        // The in-place kernel and the fallback (a strided `a`) agree exactly.
        assert_eq!(
            max_abs_diff(&add_tiled(a.copy().unwrap(), &b).unwrap(), &want),
            0.0
        );
        let strided = a.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!strided.is_contiguous());
        assert_eq!(max_abs_diff(&add_tiled(strided, &b).unwrap(), &want), 0.0);
        // One block is a plain add; blocks that do not divide are refused.
        assert_eq!(
            max_abs_diff(
                &add_tiled(b.copy().unwrap(), &b).unwrap(),
                &(&b + &b).unwrap()
            ),
            0.0
        );
        let odd = Tensor::zeros((7, 37), DType::F32, &d).unwrap();
        assert!(add_tiled(odd, &b).is_err());
    }
}
