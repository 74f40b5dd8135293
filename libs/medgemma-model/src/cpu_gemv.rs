//! Our multi-threaded CPU matmul for the Q8_0 matrices candle has no fast kernel for.
//!
//! candle's repacked x86 Q8_0 kernel needs k to be a multiple of 256 (and then quantizes the
//! activations per 256, Q8_K); for any other k it runs a generic dot-product loop, 3-10x
//! slower. Gemma 3 270M has k = 640 for q/k/v, gate/up and the 262k-row tied output head.
//! Zero-padding k to 768 would reach candle's kernel but read 20% more bytes per token (the
//! padding) and change the numerics, and a kernel reading only the real blocks of padded
//! rows in place does not help either: the hardware prefetchers stream the padding in anyway,
//! and a row-major dot product spends most of its instructions on per-row horizontal work
//! (measured slower than candle's padded kernel).
//!
//! So such a matrix is copied once, at load, into tiles of 16 rows x 32 columns laid out for
//! `vpdpbusd` (as candle's repacked kernels do, but over the true k): per 32-column block the
//! 16 f16 scales, then the 512 quants offset by +128 as `[4-column group][row][4]`. One
//! broadcast activation word times one 64-byte load gives 4 columns of 16 rows. Activation
//! rows are taken 4 at a time per tile while it is in L1, so prefill (many rows) runs here
//! too. Activations are quantized per 32 values like ggml's `quantize_row_q8_0` (f16-rounded
//! scale): results match candle's Q8_0 x Q8_0 `vec_dot` up to float rounding.
//!
//! Kernels, chosen at run time: AVX-512 VNNI and AVX2 (`vpmaddubsw` with the sign trick); a
//! portable scalar kernel is kept for correctness (tests, other architectures), but where it
//! is the only one, no copy is made and candle's path stays. Tiles are split into chunks run
//! on candle's CPU worker pool, the threads that run every other candle kernel, so no second
//! pool competes with them for the cores. `MEDGEMMA_CPU_GEMV=0` turns the kernel off.

use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use half::f16;

const QK: usize = 32;
const BLOCK_BYTES: usize = 34;
/// Rows per tile.
const TILE: usize = 16;
/// Quant bytes of one tile for one 32-column block.
const TILE_QS: usize = TILE * QK;
/// Tiles per work unit at least: enough to amortise a chunk grab.
const MIN_CHUNK_TILES: usize = 8;
/// The k multiple candle's repacked x86 Q8_0 kernel needs.
const CANDLE_FAST_K: usize = 256;

/// A Q8_0 matrix `[n, k]` as stored by ggml / `cpu_layout`: each row `k_blocks` blocks of 34
/// bytes (f16 scale, 32 i8).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8Rows<'a> {
    data: &'a [u8],
    n: usize,
    k_blocks: usize,
}

impl<'a> Q8Rows<'a> {
    /// `None` unless `data` holds `n > 0` rows of `k_blocks > 0` blocks.
    pub(crate) fn new(data: &'a [u8], n: usize, k_blocks: usize) -> Option<Self> {
        let ok = n > 0
            && k_blocks > 0
            && n.checked_mul(k_blocks)
                .and_then(|b| b.checked_mul(BLOCK_BYTES))
                .is_some_and(|len| len <= data.len());
        ok.then_some(Self { data, n, k_blocks })
    }
}

/// A zeroed buffer whose start is 64-byte aligned where the allocator allows it.
#[derive(Debug)]
struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn new(len: usize) -> Self {
        let slack = 64 / size_of::<T>();
        let buf = vec![T::default(); len + slack];
        let off = buf.as_ptr().align_offset(64);
        let off = if off <= slack { off } else { 0 };
        Self { buf, off, len }
    }

    fn get(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }

    fn get_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A Q8_0 matrix `[n, k]` re-tiled for [`gemv`]. Per tile of 16 rows: the scales
/// `[k_blocks][16]` (f16, the area padded to 64 bytes), then the quants
/// `[k_blocks][8 groups of 4 columns][16 rows][4]` as `u8` offset by +128. Rows past `n` in
/// the last tile are zero.
#[derive(Debug)]
pub(crate) struct PackedQ8 {
    n: usize,
    k_blocks: usize,
    scale_bytes: usize,
    tile_bytes: usize,
    data: Aligned<u8>,
}

impl PackedQ8 {
    /// Packs every row into tiles.
    pub(crate) fn pack(w: Q8Rows<'_>) -> Self {
        use rayon::prelude::*;
        let kb = w.k_blocks;
        let rb = w.k_blocks * BLOCK_BYTES;
        let scale_bytes = (kb * TILE * 2).next_multiple_of(64);
        let tile_bytes = scale_bytes + kb * TILE_QS;
        let tiles = w.n.div_ceil(TILE);
        let mut data = Aligned::new(tiles * tile_bytes);
        data.get_mut()
            .par_chunks_mut(tile_bytes)
            .enumerate()
            .for_each(|(t, tile)| {
                let (sc, qs) = tile.split_at_mut(scale_bytes);
                for r in 0..TILE.min(w.n - t * TILE) {
                    let row = &w.data[(t * TILE + r) * rb..][..kb * BLOCK_BYTES];
                    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                        sc[(b * TILE + r) * 2..][..2].copy_from_slice(&blk[..2]);
                        let dst = &mut qs[b * TILE_QS..][..TILE_QS];
                        for (g, q4) in blk[2..].chunks_exact(4).enumerate() {
                            for (j, &q) in q4.iter().enumerate() {
                                dst[(g * TILE + r) * 4 + j] = q ^ 0x80;
                            }
                        }
                    }
                }
            });
        Self {
            n: w.n,
            k_blocks: kb,
            scale_bytes,
            tile_bytes,
            data,
        }
    }

    /// Our copy of a CPU Q8_0 tensor `[n, k]` where candle has no kernel as fast: when k is
    /// not a multiple of 256 (candle then runs a generic dot-product loop). `None` otherwise,
    /// so large aligned models are not held twice.
    pub(crate) fn for_decode(q: &QTensor) -> candle_core::Result<Option<Arc<Self>>> {
        // The portable kernel is for correctness (and tests), not speed: without SIMD,
        // candle's own path stays.
        let simd = isa() != Isa::Scalar;
        if !enabled() || !simd || q.dtype() != GgmlDType::Q8_0 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = q.shape().dims2()?;
        if k.is_multiple_of(CANDLE_FAST_K) || !k.is_multiple_of(QK) {
            return Ok(None);
        }
        let data = q.data()?;
        Ok(Q8Rows::new(&data, n, k / QK).map(|w| Arc::new(Self::pack(w))))
    }

    /// The true input width.
    pub(crate) fn k(&self) -> usize {
        self.k_blocks * QK
    }

    fn tiles(&self) -> usize {
        self.n.div_ceil(TILE)
    }

    fn tile(&self, t: usize) -> (&[u8], &[u8]) {
        self.data.get()[t * self.tile_bytes..][..self.tile_bytes].split_at(self.scale_bytes)
    }
}

/// Instruction sets the kernel can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Self::Avx512Vnni;
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Every kernel this machine can run (for tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut v = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Self::Avx2);
            }
            if Self::detect() == Self::Avx512Vnni {
                v.push(Self::Avx512Vnni);
            }
        }
        v
    }
}

fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(Isa::detect)
}

/// Whether the kernel may be used (`MEDGEMMA_CPU_GEMV=0` turns it off, for comparisons).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MEDGEMMA_CPU_GEMV").map_or(true, |v| v != "0"))
}

/// Activation rows quantized to Q8_0 (ggml's `quantize_row_q8_0`).
#[derive(Debug)]
struct Acts {
    m: usize,
    kb: usize,
    /// `[m][kb * 32]`.
    qs: Aligned<i8>,
    /// `[m][kb]` scales (f16-rounded, as f32).
    d: Vec<f32>,
    /// `[m][kb]`: `-128 * (sum of the block's quants)`, taking back the weights' +128 offset.
    neg_corr: Vec<i32>,
}

impl Acts {
    fn quantize(x: &[f32], m: usize, kb: usize) -> Self {
        let k = kb * QK;
        let mut qs = Aligned::new(m * k);
        let mut d = vec![0f32; m * kb];
        let mut neg_corr = vec![0i32; m * kb];
        for ((xb, qb), (db, cb)) in x
            .chunks_exact(QK)
            .zip(qs.get_mut().chunks_exact_mut(QK))
            .zip(d.iter_mut().zip(neg_corr.iter_mut()))
        {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                // Round to nearest by the 1.5 * 2^23 trick (|v * id| <= 127): vectorises,
                // unlike f32::round; ties go to even as in ggml's SIMD quantizers.
                let r = (v * id + 12_582_912.0) - 12_582_912.0;
                *q = r as i8;
                sum += r as i32;
            }
            *db = f16::from_f32(scale).to_f32();
            *cb = -128 * sum;
        }
        Self {
            m,
            kb,
            qs,
            d,
            neg_corr,
        }
    }

    fn row_qs(&self, i: usize) -> &[i8] {
        &self.qs.get()[i * self.kb * QK..(i + 1) * self.kb * QK]
    }

    fn row_d(&self, i: usize) -> &[f32] {
        &self.d[i * self.kb..(i + 1) * self.kb]
    }

    fn row_corr(&self, i: usize) -> &[i32] {
        &self.neg_corr[i * self.kb..(i + 1) * self.kb]
    }
}

/// `y = x w^T` for `x [m, k]` (row-major f32, `m >= 1`): returns `[m, n]`.
pub(crate) fn gemv(w: &PackedQ8, x: &[f32], m: usize) -> Vec<f32> {
    gemv_with(isa(), w, x, m)
}

fn gemv_with(isa: Isa, w: &PackedQ8, x: &[f32], m: usize) -> Vec<f32> {
    assert!(m >= 1, "gemv takes at least one row");
    assert_eq!(x.len(), m * w.k(), "activation width");
    let acts = Acts::quantize(x, m, w.k_blocks);
    let n = w.n;
    let tiles = w.tiles();
    let mut out = vec![0f32; m * n];
    let threads = candle_core::utils::get_num_threads().max(1);
    // ~4 chunks per thread so a core slowed by other work is absorbed by the others.
    let chunk = tiles.div_ceil(threads * 4).max(MIN_CHUNK_TILES);
    let n_chunks = tiles.div_ceil(chunk);
    let rows = chunk * TILE;
    if n_chunks <= 1 {
        let mut outs: Vec<&mut [f32]> = out.chunks_mut(n).collect();
        tiles_kernel(isa, w, 0, tiles, &acts, &mut outs);
        return out;
    }
    // Per chunk, its slice of every output row; each behind its own (uncontended) lock.
    let mut per_chunk: Vec<Vec<&mut [f32]>> = (0..n_chunks).map(|_| Vec::new()).collect();
    for row in out.chunks_mut(n) {
        for (c, part) in row.chunks_mut(rows).enumerate() {
            per_chunk[c].push(part);
        }
    }
    let slots: Vec<Mutex<Vec<&mut [f32]>>> = per_chunk.into_iter().map(Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(n_chunks, |range| {
        for c in range {
            let mut outs = slots[c].lock().unwrap_or_else(|e| e.into_inner());
            let t0 = c * chunk;
            tiles_kernel(isa, w, t0, (t0 + chunk).min(tiles), &acts, &mut outs);
        }
    });
    drop(slots);
    out
}

/// `x [.., k] -> [.., n]` through the kernel when `x` is on the CPU with rows of width `k`;
/// `None` otherwise.
pub(crate) fn forward(w: &PackedQ8, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dims = x.dims();
    let Some((&xk, lead)) = dims.split_last() else {
        return Ok(None);
    };
    let m: usize = lead.iter().product();
    let k = w.k();
    if !x.device().is_cpu() || m == 0 || xk != k {
        return Ok(None);
    }
    let x = x.reshape((m, k))?;
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let y = gemv(w, &xs, m);
    let mut out_dims = lead.to_vec();
    out_dims.push(w.n);
    Ok(Some(Tensor::from_vec(y, out_dims, x.device())?))
}

/// Tiles `t0..t1` against every activation row; `outs[i][r - 16 t0]` receives row `r`.
fn tiles_kernel(isa: Isa, w: &PackedQ8, t0: usize, t1: usize, a: &Acts, outs: &mut [&mut [f32]]) {
    assert!(t0 <= t1 && t1 <= w.tiles() && outs.len() == a.m && a.kb == w.k_blocks);
    let rows = (t1 * TILE).min(w.n) - t0 * TILE;
    assert!(outs.iter().all(|o| o.len() >= rows));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => x86::tiles_avx512(w, t0, t1, a, outs),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::tiles_avx2(w, t0, t1, a, outs),
        Isa::Scalar => tiles_scalar(w, t0, t1, a, outs),
    }
}

/// Writes a tile's 16 results for activation row `out`, clipped to the matrix's rows.
fn store_tile(out: &mut [f32], t: usize, t0: usize, n: usize, v: &[f32; TILE]) {
    let r0 = t * TILE;
    let len = TILE.min(n - r0);
    out[r0 - t0 * TILE..][..len].copy_from_slice(&v[..len]);
}

fn tiles_scalar(w: &PackedQ8, t0: usize, t1: usize, a: &Acts, outs: &mut [&mut [f32]]) {
    for t in t0..t1 {
        let (sc, qs) = w.tile(t);
        for (i, out) in outs.iter_mut().enumerate() {
            let (xq, xd, xc) = (a.row_qs(i), a.row_d(i), a.row_corr(i));
            let mut acc = [0f32; TILE];
            for b in 0..w.k_blocks {
                // Fixed-size arrays and i16 products (|w| <= 255, |x| <= 127, four of them fit
                // in i32) so the compiler vectorises across the 16 rows.
                let mut isum = [xc[b]; TILE];
                for (g, q) in qs[b * TILE_QS..][..TILE_QS]
                    .chunks_exact(TILE * 4)
                    .enumerate()
                {
                    let x = &xq[b * QK + g * 4..][..4];
                    let (x0, x1, x2, x3) = (
                        i32::from(x[0]),
                        i32::from(x[1]),
                        i32::from(x[2]),
                        i32::from(x[3]),
                    );
                    for (s, w4) in isum.iter_mut().zip(q.chunks_exact(4)) {
                        *s += i32::from(w4[0]) * x0
                            + i32::from(w4[1]) * x1
                            + i32::from(w4[2]) * x2
                            + i32::from(w4[3]) * x3;
                    }
                }
                let scales = &sc[b * TILE * 2..][..TILE * 2];
                for ((v, s), d) in acc.iter_mut().zip(isum).zip(scales.chunks_exact(2)) {
                    let dw = f16::from_le_bytes([d[0], d[1]]).to_f32();
                    *v += s as f32 * (dw * xd[b]);
                }
            }
            store_tile(out, t, t0, w.n, &acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Acts, PackedQ8, QK, TILE, TILE_QS, store_tile};
    use core::arch::x86_64::*;

    /// Activation rows one pass over a tile takes: more are done in groups while the tile is
    /// in L1.
    const GROUP: usize = 4;
    /// How far ahead of the block being computed the kernel prefetches its tile stream: the
    /// hardware prefetchers alone left the output head ~8% short of what 4-8 KB ahead reaches.
    const PREFETCH_BYTES: usize = 4096;

    pub(super) fn tiles_avx512(
        w: &PackedQ8,
        t0: usize,
        t1: usize,
        a: &Acts,
        outs: &mut [&mut [f32]],
    ) {
        for t in t0..t1 {
            let (sc, qs) = w.tile(t);
            // Each tile against all activation rows, GROUP at a time, while it is in L1.
            let mut i0 = 0;
            while i0 < a.m {
                match a.m - i0 {
                    1 => group_avx512::<1>(sc, qs, w, a, i0, t, t0, outs),
                    2 => group_avx512::<2>(sc, qs, w, a, i0, t, t0, outs),
                    3 => group_avx512::<3>(sc, qs, w, a, i0, t, t0, outs),
                    _ => group_avx512::<GROUP>(sc, qs, w, a, i0, t, t0, outs),
                }
                i0 += GROUP;
            }
        }
    }

    #[allow(unsafe_code, clippy::too_many_arguments)]
    #[inline(always)]
    fn group_avx512<const M: usize>(
        sc: &[u8],
        qs: &[u8],
        w: &PackedQ8,
        a: &Acts,
        i0: usize,
        t: usize,
        t0: usize,
        outs: &mut [&mut [f32]],
    ) {
        assert!(sc.len() >= w.k_blocks * TILE * 2 && qs.len() >= w.k_blocks * TILE_QS);
        assert!(i0 + M <= a.m && a.kb == w.k_blocks);
        // SAFETY: `tiles_kernel` picks this kernel only after detecting avx512f, avx512bw and
        // avx512vnni; the asserts above bound the tile reads and the activation rows, each
        // of which holds kb blocks.
        let v = unsafe { tile_avx512::<M>(sc, qs, w.k_blocks, a, i0, i0 == 0) };
        for (out, v) in outs[i0..i0 + M].iter_mut().zip(&v) {
            store_tile(out, t, t0, w.n, v);
        }
    }

    /// One tile (16 rows) against activation rows `i0..i0 + M`.
    #[allow(unsafe_code)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_avx512<const M: usize>(
        sc: &[u8],
        qs: &[u8],
        kb: usize,
        a: &Acts,
        i0: usize,
        prefetch: bool,
    ) -> [[f32; TILE]; M] {
        let mut xq = [core::ptr::null::<i8>(); M];
        let mut xd = [&[] as &[f32]; M];
        let mut xc = [&[] as &[i32]; M];
        for i in 0..M {
            xq[i] = a.row_qs(i0 + i).as_ptr();
            xd[i] = a.row_d(i0 + i);
            xc[i] = a.row_corr(i0 + i);
        }
        // Two accumulators per activation row (even / odd blocks) halve the FMA chain.
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for b in 0..kb {
            // SAFETY: block b < kb of this tile: 32 scale bytes at 32b, 512 quant bytes at
            // 512b (asserted by the caller); activation words at 32b + 4g < 32 kb.
            unsafe {
                if prefetch {
                    // This block's share of the tile stream (scales + quants), PREFETCH_BYTES
                    // on; past the end of the matrix it is a hint that never faults.
                    let ahead = sc
                        .as_ptr()
                        .wrapping_add(b * (TILE_QS + 32) + PREFETCH_BYTES);
                    for l in 0..(TILE_QS + 32).div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l * 64) as *const i8);
                    }
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(sc.as_ptr().add(b * 32) as *const _));
                let q = qs.as_ptr().add(b * TILE_QS);
                let mut lo = [_mm512_setzero_si512(); M];
                let mut hi = [_mm512_setzero_si512(); M];
                for (l, c) in lo.iter_mut().zip(&xc) {
                    *l = _mm512_set1_epi32(c[b]);
                }
                for g in (0..QK / 4).step_by(2) {
                    let w0 = _mm512_loadu_si512(q.add(g * 64) as *const _);
                    let w1 = _mm512_loadu_si512(q.add(g * 64 + 64) as *const _);
                    for i in 0..M {
                        let x = xq[i].add(b * QK + g * 4);
                        let x0 = _mm512_set1_epi32(core::ptr::read_unaligned(x as *const i32));
                        let x1 =
                            _mm512_set1_epi32(core::ptr::read_unaligned(x.add(4) as *const i32));
                        lo[i] = _mm512_dpbusd_epi32(lo[i], w0, x0);
                        hi[i] = _mm512_dpbusd_epi32(hi[i], w1, x1);
                    }
                }
                for i in 0..M {
                    let isum = _mm512_add_epi32(lo[i], hi[i]);
                    let s = _mm512_mul_ps(dw, _mm512_set1_ps(xd[i][b]));
                    acc[i][b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc[i][b & 1]);
                }
            }
        }
        let mut out = [[0f32; TILE]; M];
        for (o, acc) in out.iter_mut().zip(&acc) {
            // SAFETY: o is 16 f32.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), _mm512_add_ps(acc[0], acc[1])) };
        }
        out
    }

    #[allow(unsafe_code)]
    pub(super) fn tiles_avx2(
        w: &PackedQ8,
        t0: usize,
        t1: usize,
        a: &Acts,
        outs: &mut [&mut [f32]],
    ) {
        for t in t0..t1 {
            let (sc, qs) = w.tile(t);
            assert!(sc.len() >= w.k_blocks * TILE * 2 && qs.len() >= w.k_blocks * TILE_QS);
            for (i, out) in outs.iter_mut().enumerate() {
                // SAFETY: `tiles_kernel` picks this kernel only after detecting avx2, fma and
                // f16c; the assert above bounds the tile reads, `Acts` holds kb blocks.
                let v = unsafe { tile_avx2(sc, qs, w.k_blocks, a, i) };
                store_tile(out, t, t0, w.n, &v);
            }
        }
    }

    /// One tile (16 rows) against activation row `i`.
    #[allow(unsafe_code, clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2(sc: &[u8], qs: &[u8], kb: usize, a: &Acts, i: usize) -> [f32; TILE] {
        let (xq, xd) = (a.row_qs(i), a.row_d(i));
        let ones = _mm256_set1_epi16(1);
        let x80 = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..kb {
            // SAFETY: as in tile_avx512: block b < kb lies in the tile and in `xq`.
            unsafe {
                let q = qs.as_ptr().add(b * TILE_QS);
                let mut isum = [_mm256_setzero_si256(); 2];
                for g in 0..QK / 4 {
                    let x = _mm256_set1_epi32(core::ptr::read_unaligned(
                        xq.as_ptr().add(b * QK + g * 4) as *const i32,
                    ));
                    for (h, s) in isum.iter_mut().enumerate() {
                        // Rows 8h..8h+8; back from +128 to signed, then |w| * (x signed as w).
                        let wv = _mm256_xor_si256(
                            _mm256_loadu_si256(q.add(g * 64 + h * 32) as *const _),
                            x80,
                        );
                        let p =
                            _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
                        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                    }
                }
                let dx = _mm256_set1_ps(xd[b]);
                for (h, acc) in acc.iter_mut().enumerate() {
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                        sc.as_ptr().add(b * 32 + h * 16) as *const _
                    ));
                    *acc =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h]), _mm256_mul_ps(dw, dx), *acc);
                }
            }
        }
        let mut out = [0f32; TILE];
        // SAFETY: out is 16 f32.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    use super::*;
    use crate::error::Result;

    /// `max |a - b| / max |b|`.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    /// Activation row counts tried: one kernel group, partial and several groups.
    const MS: [usize; 7] = [1, 2, 3, 4, 5, 8, 9];

    /// A random Q8_0 `[n, k]` (rows of different magnitudes, so scales differ) and
    /// 9 activation rows.
    fn q8(n: usize, k: usize, seed: f32) -> Result<(Arc<QTensor>, Tensor)> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let s = Tensor::arange(0f32, n as f32, &dev)?
            .affine(0.01, f64::from(seed))?
            .reshape((n, 1))?;
        let q = QTensor::quantize(&w.broadcast_mul(&s)?, GgmlDType::Q8_0)?;
        let x = Tensor::randn(0f32, 1.0, (9, k), &dev)?;
        Ok((Arc::new(q), x))
    }

    fn pack(q: &QTensor) -> Result<PackedQ8> {
        let (n, k) = q.shape().dims2()?;
        let data = q.data()?;
        let w = Q8Rows::new(&data, n, k / QK).expect("valid matrix");
        Ok(PackedQ8::pack(w))
    }

    fn rows(x: &Tensor, m: usize) -> Result<Vec<f32>> {
        Ok(x.narrow(0, 0, m)?.flatten_all()?.to_vec1()?)
    }

    #[test]
    fn matches_candle_qmatmul() -> Result<()> {
        // k not a multiple of 256: candle runs its Q8_0 x Q8_0 vec_dot, the same arithmetic.
        // n: one row, partial tiles, several chunks.
        for (n, k) in [
            (1, 32),
            (7, 96),
            (300, 160),
            (1000, 640),
            (33, 544),
            (2100, 1056),
        ] {
            let (q, x) = q8(n, k, 0.5)?;
            let mm = QMatMul::from_arc(q.clone())?;
            let p = pack(&q)?;
            for m in MS {
                let want: Vec<f32> = mm.forward(&x.narrow(0, 0, m)?)?.flatten_all()?.to_vec1()?;
                for isa in Isa::available() {
                    let got = gemv_with(isa, &p, &rows(&x, m)?, m);
                    let e = rel_err(&got, &want);
                    assert!(e < 1e-3, "{isa:?} n={n} k={k} m={m}: rel err {e}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn matches_dense_reference_all_kernels() -> Result<()> {
        // Also k multiple of 256, where candle's own kernel quantizes activations per 256
        // (Q8_K): compare against candle's Q8_0 quantizer and dequantizer and a dense matmul.
        let dev = Device::Cpu;
        for (n, k) in [(16, 256), (513, 512), (3000, 768), (5, 64), (40, 544)] {
            let (q, x) = q8(n, k, 0.1)?;
            let xq = QTensor::quantize(&x, GgmlDType::Q8_0)?.dequantize(&dev)?;
            let want: Vec<f32> = xq
                .matmul(&q.dequantize(&dev)?.t()?)?
                .flatten_all()?
                .to_vec1()?;
            let p = pack(&q)?;
            for m in MS {
                for isa in Isa::available() {
                    let got = gemv_with(isa, &p, &rows(&x, m)?, m);
                    let e = rel_err(&got, &want[..m * n]);
                    // Activation quantization rounds ties to even (as ggml does); candle's
                    // reference quantizer rounds them away from zero, so an occasional tie
                    // lands one level apart: the same 1e-3 bound as `matches_candle_qmatmul`.
                    assert!(e < 1e-3, "{isa:?} n={n} k={k} m={m}: rel err {e}");
                }
            }
        }
        Ok(())
    }

    /// `q`'s rows zero-padded to `rb` blocks (candle's fast width, the benchmark's peer).
    fn widen(q: &QTensor, rb: usize) -> Result<Vec<u8>> {
        let (n, k) = q.shape().dims2()?;
        let kb = k / QK;
        let data = q.data()?;
        let mut out = vec![0u8; n * rb * BLOCK_BYTES];
        for r in 0..n {
            let dst = &mut out[r * rb * BLOCK_BYTES..(r + 1) * rb * BLOCK_BYTES];
            dst[..kb * BLOCK_BYTES]
                .copy_from_slice(&data[r * kb * BLOCK_BYTES..][..kb * BLOCK_BYTES]);
        }
        Ok(out)
    }

    #[test]
    fn linear_forward_uses_kernel() -> Result<()> {
        use crate::weights::Linear;
        let dev = Device::Cpu;
        let (n, k) = (1000, 640);
        let (q, _) = q8(n, k, 0.2)?;
        let mm = QMatMul::from_arc(q.clone())?;
        // As loaded (k = 640, candle's generic path).
        {
            let packed = PackedQ8::for_decode(&q)?;
            assert!(packed.is_some(), "k = {k} gets the decode copy");
            let lin = Linear::Quant(QMatMul::from_arc(q.clone())?, packed);
            for m in [1, 2, 3, 4, 9] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let want: Vec<f32> = mm.forward(&x)?.flatten_all()?.to_vec1()?;
                let y = lin.forward(&x)?;
                assert_eq!(y.dims(), &[m, n]);
                let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
                // The kernel: same arithmetic as candle on k = 640.
                let tol = 1e-3;
                let e = rel_err(&got, &want);
                assert!(e < tol, "m={m}: rel err {e}");
            }
            // Rows as a 3-d input, and bf16 in / bf16 out.
            let x = Tensor::randn(0f32, 1.0, (1, 2, k), &dev)?;
            let y = lin.forward(&x)?;
            assert_eq!(y.dims(), &[1, 2, n]);
            let yb = lin.forward(&x.to_dtype(DType::BF16)?)?;
            assert_eq!(yb.dtype(), DType::BF16);
        }
        Ok(())
    }

    /// Timings against candle on this machine (noisy while other work runs: the minimum is
    /// reported). `cargo test --release -p medgemma-model --lib cpu_gemv::tests::bench --
    /// --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench() -> Result<()> {
        let dev = Device::Cpu;
        let time_ms = |f: &mut dyn FnMut()| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        };
        // A 1 GB sweep before each head call, so the head comes from DRAM as in decode.
        let mut junk = vec![1u8; 1 << 30];
        for (n, iters) in [(262_144, 15), (1536, 3000), (4096, 2000)] {
            let k = 640;
            let (q, _) = q8(n, k, 0.5)?;
            let padded = {
                let st = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(widen(&q, 768 / QK)?),
                    &dev,
                    GgmlDType::Q8_0,
                )?;
                QMatMul::from_arc(Arc::new(QTensor::new(st, (n, 768))?))?
            };
            let plain = QMatMul::from_arc(q.clone())?;
            let p = pack(&q)?;
            let cold = n > 100_000;
            for m in [1, 4, 32] {
                let xm = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let xp = Tensor::cat(&[&xm, &Tensor::zeros((m, 768 - k), DType::F32, &dev)?], 1)?;
                let xs: Vec<f32> = xm.flatten_all()?.to_vec1()?;
                let mut t = [f64::MAX; 3];
                for it in 0..iters {
                    if cold {
                        junk.iter_mut()
                            .step_by(64)
                            .for_each(|b| *b = b.wrapping_add(1));
                    }
                    let c = time_ms(&mut || {
                        padded.forward(&xp).expect("matmul");
                    });
                    if it > 0 {
                        t[0] = t[0].min(c); // the first call packs candle's copy
                    }
                    if cold {
                        junk.iter_mut()
                            .step_by(64)
                            .for_each(|b| *b = b.wrapping_add(1));
                    }
                    t[2] = t[2].min(time_ms(&mut || {
                        std::hint::black_box(gemv(&p, &xs, m));
                    }));
                    if it < 3 {
                        t[1] = t[1].min(time_ms(&mut || {
                            plain.forward(&xm).expect("matmul");
                        }));
                    }
                }
                println!(
                    "n={n} k={k} m={m}{}: candle k=768 (padded) {:.3} ms, candle k=640 {:.3} ms, \
                     this kernel {:.3} ms",
                    if cold { " (cold)" } else { "" },
                    t[0],
                    t[1],
                    t[2]
                );
            }
        }
        std::hint::black_box(junk);
        Ok(())
    }

    #[test]
    fn decode_copy_only_where_candle_is_slow() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (32, 512), &dev)?;
        // k = 512: candle's repacked kernel applies, no copy.
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        assert!(PackedQ8::for_decode(&q8)?.is_none());
        // k = 640: candle's generic loop, copy.
        let w640 = Tensor::randn(0f32, 1.0, (32, 640), &dev)?;
        let q640 = QTensor::quantize(&w640, GgmlDType::Q8_0)?;
        assert!(PackedQ8::for_decode(&q640)?.is_some());
        // Other types: never.
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K)?;
        assert!(PackedQ8::for_decode(&q4)?.is_none());
        assert!(Q8Rows::new(&[0u8; 33], 1, 1).is_none());
        assert!(Q8Rows::new(&[0u8; 68], 1, 3).is_none());
        // A width it does not know: candle's path.
        let p = PackedQ8::for_decode(&q640)?.expect("k = 640");
        let x = Tensor::randn(0f32, 1.0, (1, 448), &dev)?;
        assert!(forward(&p, &x)?.is_none());
        Ok(())
    }
}
