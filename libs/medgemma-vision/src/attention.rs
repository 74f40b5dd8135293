//! Fused bidirectional attention for the SigLIP tower on CPU, f32: scores, softmax and the
//! value product for a block of queries in one pass over the keys, never materialising the
//! `[n, n]` score matrix (flash-attention's online softmax, written for CPU registers).
//!
//! Layout trick: queries run along the vector lanes. A block of `QB` queries (four 16-lane
//! vectors) is transposed once into `q^T [head_dim][QB]`; each score tile is then
//! `s^T [keys][QB]`, so the softmax's running max and sum are lane-wise vector operations
//! (no horizontal reductions), and `o^T [head_dim][QB] += v^T p^T` is again a broadcast-FMA
//! tile. Both tiles keep 24 accumulators in registers (`KT` = 6 keys or head dims by four
//! vectors), the shape of a gemm microkernel: per step, four loads and six broadcasts feed
//! 24 FMAs. Padding queries or keys or dims to the tiles costs nothing at SigLIP's shapes
//! (4096 patches, head_dim 72).
//!
//! Keys go in chunks of `CHUNK` so a chunk's scores stay in L1. K is packed per head into
//! `[key tile][head_dim][KT]` and V into `[dim tile][key][KT]`, so every tile's broadcasts
//! read memory in order. The score tile also folds its lane-wise max into the running max. Padding
//! keys (to a multiple of `KT`) get a score of -inf, so they get weight exactly 0; padded
//! query lanes compute on zeros and are never written out.
//!
//! The algorithm is written once over a 16-lane vector type: `Zmm` (AVX-512 intrinsics)
//! runs it on CPUs that have AVX-512; `Lanes` (plain arrays) is the portable build the
//! tests check against a naive reference on every machine. Without AVX-512 the tower keeps
//! its gemm-based path, which beats the portable build there.
//!
//! At so400m's shape (16 heads x 4096 x 4096, head_dim 72) this runs ~0.29 s per layer on two
//! cores, against ~0.45 s for per-head gemm blocks with a separate softmax.
#![allow(unsafe_code)]

use rayon::prelude::*;

use medgemma_model::cpu_ops::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO, LOG2E, exp_approx};

/// f32 lanes per vector.
const W: usize = 16;
/// Vectors of queries per block.
const NV: usize = 4;
/// Queries per block.
const QB: usize = NV * W;
/// Keys per score tile, and head dims per value tile (24 accumulators with the NV vectors).
const KT: usize = 6;
/// Keys per online-softmax step: a 96 x 64 f32 score chunk is 24 KiB, half of L1.
const CHUNK: usize = 16 * KT;

/// The 16-lane f32 vector the kernel is written against.
trait Vf: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// `p` is 64-byte aligned where the kernel calls it, but need not be.
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a * b + c`.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    /// `e^x`, 0 for `x` below -87 (and for -inf).
    unsafe fn exp(self) -> Self;
}

/// Portable 16-lane vector; loops the compiler vectorises.
#[derive(Clone, Copy)]
struct Lanes([f32; W]);

impl Lanes {
    #[inline(always)]
    fn map2(a: Self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Lanes(std::array::from_fn(|i| f(a.0[i], b.0[i])))
    }
}

impl Vf for Lanes {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Lanes([0.0; W])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Lanes([x; W])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller passes W readable floats at `p`.
        Lanes(unsafe { p.cast::<[f32; W]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller passes W writable floats at `p`.
        unsafe { p.cast::<[f32; W]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Lanes(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], c.0[i])))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        Lanes(self.0.map(|x| if x < EXP_LO { 0.0 } else { exp_approx(x) }))
    }
}

#[cfg(target_arch = "x86_64")]
mod zmm {
    use super::*;
    use std::arch::x86_64::*;

    /// One AVX-512 register. Its methods are only called from `#[target_feature(enable =
    /// "avx512f")]` code (`block_avx512`), where they inline to single instructions.
    #[derive(Clone, Copy)]
    pub(super) struct Zmm(__m512);

    impl Vf for Zmm {
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY (all methods): only reached on CPUs with AVX-512F (`available`); pointer
            // arguments are as the trait documents.
            Zmm(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Zmm(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Zmm(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Zmm(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Zmm(unsafe { _mm512_mul_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            Zmm(unsafe { _mm512_sub_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Zmm(unsafe { _mm512_add_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            Zmm(unsafe { _mm512_max_ps(a.0, b.0) })
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            unsafe {
                let x = self.0;
                let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_LO));
                let c = _mm512_min_ps(
                    _mm512_max_ps(x, _mm512_set1_ps(EXP_LO)),
                    _mm512_set1_ps(EXP_HI),
                );
                let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(c, _mm512_set1_ps(LOG2E)),
                );
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), c);
                let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
                let mut p = _mm512_set1_ps(EXP_POLY[0]);
                for &k in &EXP_POLY[1..] {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
                }
                let p = _mm512_fmadd_ps(
                    _mm512_mul_ps(p, r),
                    r,
                    _mm512_add_ps(r, _mm512_set1_ps(1.0)),
                );
                // p * 2^n, then lanes below the range to exactly 0.
                Zmm(_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n)))
            }
        }
    }
}

/// 64-byte aligned storage for the per-thread scratch tiles.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; W]);

/// Per-thread scratch: `q^T`, one chunk of `s^T`, and the `o^T` accumulator.
struct Scratch {
    qt: Vec<Line>,
    s: Vec<Line>,
    o: Vec<Line>,
}

impl Scratch {
    fn new(hd: usize, hdp: usize) -> Self {
        let lines = |rows: usize| vec![Line([0.0; W]); rows * QB / W];
        Scratch {
            qt: lines(hd),
            s: lines(CHUNK),
            o: lines(hdp),
        }
    }
}

/// One head's inputs and one query block's output, as raw strided pointers.
#[derive(Clone, Copy)]
struct Block {
    /// This block's first query row, head offset applied; rows `q_stride` apart.
    q: *const f32,
    q_stride: usize,
    /// Valid queries in the block (`<= QB`).
    nq: usize,
    /// Packed keys of the head, `[n_pad / KT][hd][KT]`.
    kp: *const f32,
    /// Values of the head packed into dim tiles, `[hdp / KT][n_pad][KT]`, zero-padded.
    vp: *const f32,
    n: usize,
    n_pad: usize,
    hd: usize,
    hdp: usize,
    scale: f32,
    /// This block's first output row, head offset applied; rows `out_stride` apart.
    out: *mut f32,
    out_stride: usize,
}

/// `s^T[KT][QB] = k_tile q^T`, reducing over the head dims; folds the tile's lane-wise
/// maximum into `mx`.
#[inline(always)]
unsafe fn qk_tile<V: Vf>(qt: *const f32, kt: *const f32, hd: usize, s: *mut f32, mx: &mut [V; NV]) {
    // SAFETY: `qt` holds hd x QB floats, `kt` hd x KT, `s` KT x QB (see `block`).
    unsafe {
        let mut acc = [[V::zero(); NV]; KT];
        for d in 0..hd {
            let q: [V; NV] = std::array::from_fn(|h| V::load(qt.add(d * QB + h * W)));
            let kd = kt.add(d * KT);
            for (i, a) in acc.iter_mut().enumerate() {
                let b = V::splat(*kd.add(i));
                for h in 0..NV {
                    a[h] = V::fma(b, q[h], a[h]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for h in 0..NV {
                a[h].store(s.add(i * QB + h * W));
                mx[h] = V::max(mx[h], a[h]);
            }
        }
    }
}

/// `o^T[KT dims][QB] = alpha * o^T + v[keys][KT dims]^T p^T[keys][QB]`; `v` is one packed
/// value tile, `KT` dims per key, keys contiguous.
#[inline(always)]
unsafe fn pv_tile<V: Vf>(s: *const f32, keys: usize, v: *const f32, o: *mut f32, alpha: [V; NV]) {
    // SAFETY: `s` holds keys x QB floats, `v` rows `hdp` apart with KT readable per row,
    // `o` KT x QB (see `block`).
    unsafe {
        let mut acc: [[V; NV]; KT] = std::array::from_fn(|i| {
            std::array::from_fn(|h| V::mul(V::load(o.add(i * QB + h * W)), alpha[h]))
        });
        for k in 0..keys {
            let p: [V; NV] = std::array::from_fn(|h| V::load(s.add(k * QB + h * W)));
            let vk = v.add(k * KT);
            for (i, a) in acc.iter_mut().enumerate() {
                let b = V::splat(*vk.add(i));
                for h in 0..NV {
                    a[h] = V::fma(b, p[h], a[h]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (h, x) in a.iter().enumerate() {
                x.store(o.add(i * QB + h * W));
            }
        }
    }
}

/// Attention for one query block of one head.
#[inline(always)]
unsafe fn block<V: Vf>(b: Block, scr: &mut Scratch) {
    let qt = scr.qt.as_mut_ptr().cast::<f32>();
    let s = scr.s.as_mut_ptr().cast::<f32>();
    let o = scr.o.as_mut_ptr().cast::<f32>();
    // SAFETY: `Block`'s pointers cover the rows and columns described there (built by
    // `attention`); the scratch tiles are sized by `Scratch::new(hd, hdp)`.
    unsafe {
        // q^T, pre-scaled; padded lanes are zero.
        for j in 0..QB {
            for d in 0..b.hd {
                *qt.add(d * QB + j) = if j < b.nq {
                    *b.q.add(j * b.q_stride + d) * b.scale
                } else {
                    0.0
                };
            }
        }
        std::ptr::write_bytes(o, 0, b.hdp * QB);
        let mut m = [V::splat(f32::NEG_INFINITY); NV];
        let mut l = [V::zero(); NV];
        let mut c0 = 0;
        while c0 < b.n_pad {
            let keys = CHUNK.min(b.n_pad - c0);
            // Scores and their new running max (padding keys only ever sit in the last
            // tile, which is scored apart so their -inf never reaches the max).
            let mut mx = m;
            let full = keys / KT - usize::from(c0 + keys > b.n);
            for t in 0..full {
                let kt = b.kp.add((c0 + t * KT) * b.hd);
                qk_tile::<V>(qt, kt, b.hd, s.add(t * KT * QB), &mut mx);
            }
            if full < keys / KT {
                let mut unused = mx;
                let kt = b.kp.add((c0 + full * KT) * b.hd);
                qk_tile::<V>(qt, kt, b.hd, s.add(full * KT * QB), &mut unused);
                for k in full * KT..keys {
                    let row = s.add(k * QB);
                    for (h, x) in mx.iter_mut().enumerate() {
                        if c0 + k >= b.n {
                            V::splat(f32::NEG_INFINITY).store(row.add(h * W));
                        } else {
                            *x = V::max(*x, V::load(row.add(h * W)));
                        }
                    }
                }
            }
            // Online softmax: rescale factor, exponentials and their sum.
            let alpha: [V; NV] = std::array::from_fn(|h| V::sub(m[h], mx[h]).exp());
            let mut sum = [V::zero(); NV];
            for k in 0..keys {
                for h in 0..NV {
                    let p = s.add(k * QB + h * W);
                    let e = V::sub(V::load(p), mx[h]).exp();
                    e.store(p);
                    sum[h] = V::add(sum[h], e);
                }
            }
            for (h, x) in l.iter_mut().enumerate() {
                *x = V::fma(*x, alpha[h], sum[h]);
            }
            m = mx;
            for dt in 0..b.hdp / KT {
                let vt = b.vp.add((dt * b.n_pad + c0) * KT);
                pv_tile::<V>(s, keys, vt, o.add(dt * KT * QB), alpha);
            }
            c0 += keys;
        }
        // o / l, transposed back to rows.
        let mut inv = [0f32; QB];
        for (h, x) in l.iter().enumerate() {
            x.store(inv.as_mut_ptr().add(h * W));
        }
        for (j, &lj) in inv[..b.nq].iter().enumerate() {
            let r = 1.0 / lj;
            for d in 0..b.hd {
                *b.out.add(j * b.out_stride + d) = *o.add(d * QB + j) * r;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(b: Block, scr: &mut Scratch) {
    // SAFETY: as `block`; the caller checked the CPU for AVX-512F.
    unsafe { block::<zmm::Zmm>(b, scr) }
}

/// Whether the fused kernel runs natively here (AVX-512F); `MEDGEMMA_CPU_SIMD=0` turns it off.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var_os("MEDGEMMA_CPU_SIMD").is_none_or(|v| v != "0")
                && is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output rows/columns (one head's columns of one
// query block), and `out` outlives the parallel loop.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the `SendPtr`, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Bidirectional attention over `n` tokens: `qkv` is row-major `[n, 3 * heads * hd]` (q, k, v
/// side by side, heads contiguous inside each), `out` is `[n, heads * hd]`. `portable` runs
/// the plain-array build instead of AVX-512 (tests; `available()` decides in production).
pub(crate) fn attention(
    qkv: &[f32],
    n: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    out: &mut [f32],
    portable: bool,
) {
    let hidden = heads * hd;
    let row = 3 * hidden;
    assert_eq!(qkv.len(), n * row, "qkv is [n, 3 * hidden]");
    assert_eq!(out.len(), n * hidden, "out is [n, hidden]");
    if n == 0 || hidden == 0 {
        return;
    }
    let n_pad = n.div_ceil(KT) * KT;
    let hdp = hd.div_ceil(KT) * KT;
    // Per head: K packed into key tiles, V into dim tiles (zero-padded to hdp dims).
    let mut kp = vec![0f32; heads * n_pad * hd];
    let mut vp = vec![0f32; heads * n_pad * hdp];
    kp.par_chunks_mut(n_pad * hd)
        .zip(vp.par_chunks_mut(n_pad * hdp))
        .enumerate()
        .for_each(|(h, (kh, vh))| {
            for key in 0..n {
                let src = &qkv[key * row..][..row];
                let k = &src[hidden + h * hd..][..hd];
                let (t, i) = (key / KT, key % KT);
                for (d, &x) in k.iter().enumerate() {
                    kh[(t * hd + d) * KT + i] = x;
                }
                let v = &src[2 * hidden + h * hd..][..hd];
                for (d, &x) in v.iter().enumerate() {
                    vh[((d / KT) * n_pad + key) * KT + d % KT] = x;
                }
            }
        });
    let blocks = n.div_ceil(QB);
    let dst = SendPtr(out.as_mut_ptr());
    // Read-only through these three; `SendPtr` only carries them into the tasks.
    let qp = SendPtr(qkv.as_ptr().cast_mut());
    let kpp = SendPtr(kp.as_ptr().cast_mut());
    let vpp = SendPtr(vp.as_ptr().cast_mut());
    // Head-major order: the two halves rayon first splits into each keep their heads' K/V
    // in their own core's cache.
    (0..heads * blocks).into_par_iter().for_each_init(
        || Scratch::new(hd, hdp),
        |scr, item| {
            let (h, qb) = (item / blocks, item % blocks);
            let r0 = qb * QB;
            // SAFETY: offsets stay inside `qkv`, `kp`, `vp` and `out` (sizes asserted and
            // allocated above); each item writes only rows r0.. r0+nq of head h's columns.
            let blk = unsafe {
                Block {
                    q: qp.get().add(r0 * row + h * hd),
                    q_stride: row,
                    nq: QB.min(n - r0),
                    kp: kpp.get().add(h * n_pad * hd),
                    vp: vpp.get().add(h * n_pad * hdp),
                    n,
                    n_pad,
                    hd,
                    hdp,
                    scale,
                    out: dst.get().add(r0 * hidden + h * hd),
                    out_stride: hidden,
                }
            };
            #[cfg(target_arch = "x86_64")]
            if !portable && available() {
                // SAFETY: `available()` checked for AVX-512F; `blk` as above.
                unsafe { block_avx512(blk, scr) };
                return;
            }
            let _ = portable;
            // SAFETY: `blk` as above.
            unsafe { block::<Lanes>(blk, scr) };
        },
    );
}

/// [`attention`] as a candle op on a contiguous f32 CPU `qkv` `[n, 3 * heads * hd]`.
struct FusedAttention {
    heads: usize,
    hd: usize,
    scale: f32,
}

impl candle_core::CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "medgemma-fused-attention"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let hidden = self.heads * self.hd;
        let (n, cols) = l.shape().dims2()?;
        if cols != 3 * hidden {
            candle_core::bail!("fused attention: qkv of {cols} columns for {hidden} hidden")
        }
        let qkv = medgemma_model::cpu_ops::f32_slice(s, l, "fused attention")?;
        let mut out = vec![0f32; n * hidden];
        attention(qkv, n, self.heads, self.hd, self.scale, &mut out, false);
        Ok((candle_core::CpuStorage::F32(out), (n, hidden).into()))
    }
}

/// Fused attention over a CPU f32 `qkv` `[n, 3 * heads * hd]` -> `[n, heads * hd]`, or `None`
/// where it does not apply (no AVX-512F, another device or dtype): the caller's own path runs.
pub(crate) fn try_fused(
    qkv: &candle_core::Tensor,
    heads: usize,
    hd: usize,
    scale: f32,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    if !(available() && qkv.device().is_cpu() && qkv.dtype() == candle_core::DType::F32) {
        return Ok(None);
    }
    let op = FusedAttention { heads, hd, scale };
    Ok(Some(qkv.contiguous()?.apply_op1_no_bwd(&op)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 softmax(q k^T * scale) v per head.
    fn naive(qkv: &[f32], n: usize, heads: usize, hd: usize, scale: f32) -> Vec<f32> {
        let hidden = heads * hd;
        let row = 3 * hidden;
        let mut out = vec![0f32; n * hidden];
        for h in 0..heads {
            for i in 0..n {
                let q = &qkv[i * row + h * hd..][..hd];
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let k = &qkv[j * row + hidden + h * hd..][..hd];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let v: f64 = (0..n)
                        .map(|j| e[j] * qkv[j * row + 2 * hidden + h * hd + d] as f64)
                        .sum();
                    out[i * hidden + h * hd + d] = (v / z) as f32;
                }
            }
        }
        out
    }

    fn data(len: usize, seed: u64, amp: f32) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-amp..amp)).collect()
    }

    fn check(n: usize, heads: usize, hd: usize, amp: f32, portable: bool) {
        let qkv = data(n * 3 * heads * hd, (n * 31 + hd) as u64, amp);
        let scale = (hd as f32).powf(-0.5);
        let want = naive(&qkv, n, heads, hd, scale);
        let mut got = vec![f32::NAN; n * heads * hd];
        attention(&qkv, n, heads, hd, scale, &mut got, portable);
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            err < 2e-5,
            "n {n} heads {heads} hd {hd} amp {amp} portable {portable}: max |diff| {err}"
        );
    }

    /// Shapes off every tile size: tokens not a multiple of the key tile, query block or
    /// chunk; head dims not a multiple of the value tile; one token; more than one chunk.
    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 8),
        (7, 2, 5),
        (33, 3, 16),
        (200, 2, 12),
        (257, 2, 72),
        (451, 1, 20),
    ];

    #[test]
    fn portable_build_matches_naive_attention() {
        for (n, heads, hd) in SHAPES {
            check(n, heads, hd, 1.0, true);
        }
        // Large scores: the running max moves between chunks and most weights underflow.
        check(451, 1, 20, 6.0, true);
    }

    #[test]
    fn native_build_matches_naive_attention() {
        if !available() {
            eprintln!("no AVX-512F here: the native build is the portable one");
        }
        for (n, heads, hd) in SHAPES {
            check(n, heads, hd, 1.0, false);
        }
        check(451, 1, 20, 6.0, false);
    }
}
