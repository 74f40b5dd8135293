//! GPU-shaped attention over the paged KV cache: one kernel call per layer for every sequence
//! of a step (prefill chunks and decode rows alike), reading each sequence's keys and values in
//! place from per-layer block pools through its block table, with the mask (sliding window,
//! causal, bidirectional within an image) computed inside the kernel from positions and image
//! groups, never materialised.
//!
//! The host builds one [`PagedBatch`] per layer kind per forward call: a flat `u32` buffer of
//! per-row and per-sequence metadata and the block tables, uploaded once; every layer of that
//! kind reuses it. Two ops run on it:
//! - [`write_rows`]: the new rows' keys and values scattered into their pool slots (one launch
//!   for all rows, k and v each);
//! - [`attention`]: `[heads, total, head_dim]` queries -> `[total, heads, head_dim]` output.
//!
//! On CUDA both are the kernels of [`KERNELS`], compiled at run time with NVRTC (so building
//! needs no nvcc for them; see ARCHITECTURE.md for the trade-offs); on the CPU the same
//! algorithm runs in plain Rust, which is what the CPU tests check against the CPU path.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor};

use crate::error::{ModelError, Result};

/// Threads per block of the attention kernel: one key per thread per tile.
pub const ATTN_THREADS: u32 = 128;
/// The largest head dimension the attention kernel takes (each thread owns
/// `head_dim / ATTN_THREADS` output dims in registers).
pub const MAX_HEAD_DIM: usize = 512;
/// Most threads per block of the KV write kernel.
pub const WRITE_THREADS: u32 = 256;
/// The grid's y dimension limit (heads).
const MAX_GRID_Y: usize = 65_535;
/// The grid's x dimension limit (rows).
const MAX_GRID_X: usize = (1 << 31) - 1;
/// Static shared memory the kernel may use without opting in.
const MAX_SHARED_BYTES: usize = 48 << 10;

/// A kernel launch: grid, block and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// The attention kernel's launch: one block per (packed row, head), [`ATTN_THREADS`] threads;
/// shared memory for the query row (f32), one tile of scores, one tile of pool slots and the
/// reduction scratch.
pub fn attention_launch(rows: usize, heads: usize, head_dim: usize) -> Result<LaunchShape> {
    if rows == 0 || heads == 0 {
        return Err(ModelError::InvalidInput(
            "paged attention over no rows".into(),
        ));
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(ModelError::Limit(format!(
            "head_dim {head_dim} is outside the paged attention kernel's 1..={MAX_HEAD_DIM}"
        )));
    }
    if rows > MAX_GRID_X || heads > MAX_GRID_Y {
        return Err(ModelError::Limit(format!(
            "{rows} rows x {heads} heads exceed the CUDA grid"
        )));
    }
    let t = ATTN_THREADS as usize;
    let shared = (head_dim + 3 * t) * 4;
    if shared > MAX_SHARED_BYTES {
        return Err(ModelError::Limit(format!(
            "paged attention needs {shared} bytes of shared memory"
        )));
    }
    Ok(LaunchShape {
        grid: (rows as u32, heads as u32, 1),
        block: (ATTN_THREADS, 1, 1),
        shared_bytes: shared as u32,
    })
}

/// The KV write kernel's launch: one block per packed row, its threads striding over the
/// row's `kv_heads * head_dim` elements.
pub fn write_launch(rows: usize, kv_heads: usize, head_dim: usize) -> Result<LaunchShape> {
    if rows == 0 || rows > MAX_GRID_X {
        return Err(ModelError::Limit(format!(
            "{rows} rows for the KV write kernel"
        )));
    }
    let width = kv_heads * head_dim;
    let threads = width.clamp(1, WRITE_THREADS as usize).next_power_of_two() as u32;
    Ok(LaunchShape {
        grid: (rows as u32, 1, 1),
        block: (threads.min(WRITE_THREADS), 1, 1),
        shared_bytes: 0,
    })
}

/// Where each section of the metadata buffer starts (in `u32`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetaOffsets {
    /// Per packed row: its sequence index.
    pub row_seq: usize,
    /// Per packed row: its position.
    pub row_pos: usize,
    /// Per packed row: its image group (0: text).
    pub row_group: usize,
    /// Per sequence, [`SEQ_FIELDS`] values: first packed row, new rows, position of the first
    /// new row, position of the table's first block, offset of its table.
    pub seqs: usize,
    /// The block tables, one after the other.
    pub tables: usize,
}

/// Values per sequence in the metadata.
pub const SEQ_FIELDS: usize = 5;

/// One sequence's share of a step, as the metadata builder needs it.
#[derive(Debug, Clone)]
pub struct SeqPlan<'a> {
    /// First packed row.
    pub offset: usize,
    /// New rows.
    pub n: usize,
    /// Position of the first new row.
    pub start: usize,
    /// Image group of each new row (`None`: text).
    pub groups: &'a [Option<u32>],
    /// Position of the first block of the table, and the block ids in order.
    pub first: usize,
    pub table: Vec<u32>,
}

/// The metadata of one forward call for one layer kind, on the host and on the device.
#[derive(Debug, Clone)]
pub struct PagedBatch {
    pub total: usize,
    pub seqs: usize,
    /// The sliding window; 0 for global layers.
    pub window: usize,
    pub block_size: usize,
    pub offsets: MetaOffsets,
    pub meta: Arc<Vec<u32>>,
    /// Pool slot (`block * block_size + row in block`) of each packed row.
    pub slots: Arc<Vec<u32>>,
    /// `meta` then `slots` on the model's device (`u32`), uploaded once per forward call.
    pub meta_dev: Tensor,
    pub slots_dev: Tensor,
}

fn to_u32(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| ModelError::Limit(format!("{what} {x} exceeds u32")))
}

impl PagedBatch {
    /// Builds the metadata of `seqs` (in packed order) and uploads it to `device`.
    pub fn build(
        seqs: &[SeqPlan<'_>],
        window: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let total: usize = seqs.iter().map(|s| s.n).sum();
        let table_len: usize = seqs.iter().map(|s| s.table.len()).sum();
        let offsets = MetaOffsets {
            row_seq: 0,
            row_pos: total,
            row_group: 2 * total,
            seqs: 3 * total,
            tables: 3 * total + SEQ_FIELDS * seqs.len(),
        };
        let mut meta = vec![0u32; offsets.tables + table_len];
        let mut slots = vec![0u32; total];
        let mut table_at = 0;
        let mut group_base = 0u32;
        for (si, s) in seqs.iter().enumerate() {
            if s.n == 0 {
                continue;
            }
            if s.groups.len() != s.n || s.first > s.start {
                return Err(ModelError::InvalidInput(
                    "paged batch: inconsistent sequence rows".into(),
                ));
            }
            let end = s.start + s.n;
            if (end - s.first).div_ceil(block_size) > s.table.len() {
                return Err(ModelError::InvalidInput(
                    "paged batch: block table shorter than the sequence".into(),
                ));
            }
            let mut max_group = 0;
            for i in 0..s.n {
                let r = s.offset + i;
                let pos = s.start + i;
                meta[offsets.row_seq + r] = to_u32(si, "sequence")?;
                meta[offsets.row_pos + r] = to_u32(pos, "position")?;
                // Groups are numbered per sequence from 1; offset them so no two sequences
                // share a number (the kernel compares groups within one sequence only, but
                // distinct numbers keep the buffer unambiguous).
                meta[offsets.row_group + r] = s.groups[i].map_or(0, |g| group_base + g);
                max_group = max_group.max(s.groups[i].unwrap_or(0));
                let rel = pos - s.first;
                let block = s.table[rel / block_size] as usize;
                slots[r] = to_u32(block * block_size + rel % block_size, "pool slot")?;
            }
            group_base += max_group;
            let at = offsets.seqs + SEQ_FIELDS * si;
            meta[at] = to_u32(s.offset, "row")?;
            meta[at + 1] = to_u32(s.n, "rows")?;
            meta[at + 2] = to_u32(s.start, "position")?;
            meta[at + 3] = to_u32(s.first, "position")?;
            meta[at + 4] = to_u32(table_at, "table offset")?;
            let t0 = offsets.tables + table_at;
            meta[t0..t0 + s.table.len()].copy_from_slice(&s.table);
            table_at += s.table.len();
        }
        let meta_dev = Tensor::from_slice(&meta, meta.len(), device)?;
        let slots_dev = Tensor::from_slice(&slots, slots.len(), device)?;
        Ok(Self {
            total,
            seqs: seqs.len(),
            window,
            block_size,
            offsets,
            meta: Arc::new(meta),
            slots: Arc::new(slots),
            meta_dev,
            slots_dev,
        })
    }
}

/// The attention's shape parameters.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Writes the new rows' keys or values (`rows`: `[kv_heads, total, head_dim]`, contiguous) into
/// `pool` (`[blocks, block_size, kv_heads, head_dim]`) at the batch's slots.
pub fn write_rows(pool: &Tensor, rows: &Tensor, b: &PagedBatch) -> Result<()> {
    pool.inplace_op2(&rows.contiguous()?, &KvWrite { b })?;
    Ok(())
}

/// Attention of every packed row: `q` `[heads, total, head_dim]` over the pools -> `[total,
/// heads, head_dim]` in `q`'s dtype.
pub fn attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    b: &PagedBatch,
    dims: AttnDims,
) -> Result<Tensor> {
    if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
        return Err(ModelError::InvalidInput(format!(
            "{} heads over {} kv heads",
            dims.heads, dims.kv_heads
        )));
    }
    attention_launch(b.total, dims.heads, dims.head_dim)?;
    Ok(q.contiguous()?
        .apply_op3_no_bwd(k_pool, v_pool, &PagedAttention { b, dims })?)
}

struct KvWrite<'a> {
    b: &'a PagedBatch,
}

struct PagedAttention<'a> {
    b: &'a PagedBatch,
    dims: AttnDims,
}

/// The pool's `[blocks, block_size, kv_heads, head_dim]`, checked against the batch.
fn pool_dims(l: &Layout, b: &PagedBatch) -> candle_core::Result<(usize, usize, usize)> {
    let (blocks, bs, kvh, hd) = l.shape().dims4()?;
    if bs != b.block_size || !l.is_contiguous() {
        candle_core::bail!("paged pool layout {:?} for block size {}", l, b.block_size);
    }
    Ok((blocks, kvh, hd))
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, op: &'static str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, z)) => Ok(&s[a..z]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

/// A float type the CPU reference reads and writes.
trait Elem: Copy + Send + Sync + 'static {
    fn f(self) -> f32;
    fn from(x: f32) -> Self;
}

impl Elem for f32 {
    fn f(self) -> f32 {
        self
    }
    fn from(x: f32) -> Self {
        x
    }
}

impl Elem for half::bf16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

fn cpu_write<T: Elem>(pool: &mut [T], rows: &[T], b: &PagedBatch, width: usize, hd: usize) {
    let (total, kvh) = (b.total, width / hd);
    for (r, &slot) in b.slots.iter().enumerate() {
        let dst = &mut pool[slot as usize * width..(slot as usize + 1) * width];
        for g in 0..kvh {
            let src = &rows[(g * total + r) * hd..(g * total + r + 1) * hd];
            dst[g * hd..(g + 1) * hd].copy_from_slice(src);
        }
    }
}

impl candle_core::InplaceOp2 for KvWrite<'_> {
    fn name(&self) -> &'static str {
        "medgemma-kv-write"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (_, kvh, hd) = pool_dims(l1, self.b)?;
        let (rkvh, rows, rhd) = l2.shape().dims3()?;
        if (rkvh, rows, rhd) != (kvh, self.b.total, hd) {
            candle_core::bail!("kv write: rows {:?} for pool {:?}", l2.shape(), l1.shape());
        }
        let off = l1.start_offset();
        match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(r)) => {
                let r = contiguous(r, l2, "kv-write")?;
                cpu_write(&mut p[off..], r, self.b, kvh * hd, hd)
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(r)) => {
                let r = contiguous(r, l2, "kv-write")?;
                cpu_write(&mut p[off..], r, self.b, kvh * hd, hd)
            }
            _ => candle_core::bail!("kv write: pool and rows must both be f32 or bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        crate::paged_cuda::write(s1, l1, s2, l2, self.b)
    }
}

/// The key range a query row may see, and whether keys past it (same image) may be visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRange {
    /// First key position to look at.
    pub lo: usize,
    /// One past the last key position to look at.
    pub hi: usize,
}

/// Which keys row `r` looks at: from the table's first position (and, on sliding layers, the
/// window's start) to its own position, or to the end of its sequence's new rows for an image
/// row (its image's later rows are visible). The kernel computes the same.
pub fn key_range(b: &PagedBatch, r: usize) -> KeyRange {
    let m = &b.meta;
    let o = b.offsets;
    let s = m[o.row_seq + r] as usize;
    let at = o.seqs + SEQ_FIELDS * s;
    let (n, start, first) = (m[at + 1] as usize, m[at + 2] as usize, m[at + 3] as usize);
    let pos = m[o.row_pos + r] as usize;
    let mut lo = first;
    if b.window > 0 && pos + 1 > b.window {
        lo = lo.max(pos + 1 - b.window);
    }
    let hi = if m[o.row_group + r] != 0 {
        start + n
    } else {
        pos + 1
    };
    KeyRange { lo, hi }
}

/// Whether row `r` (at `pos`) sees key position `k`: window AND (causal OR same image).
pub fn visible(b: &PagedBatch, r: usize, k: usize) -> bool {
    let m = &b.meta;
    let o = b.offsets;
    let pos = m[o.row_pos + r] as usize;
    if b.window > 0 && pos >= k + b.window {
        return false;
    }
    if k <= pos {
        return true;
    }
    let g = m[o.row_group + r];
    let at = o.seqs + SEQ_FIELDS * m[o.row_seq + r] as usize;
    let (off, start) = (m[at] as usize, m[at + 2] as usize);
    g != 0 && k >= start && m[o.row_group + off + k - start] == g
}

/// The pool slot of key position `k` of row `r`'s sequence.
fn key_slot(b: &PagedBatch, r: usize, k: usize) -> usize {
    let m = &b.meta;
    let o = b.offsets;
    let at = o.seqs + SEQ_FIELDS * m[o.row_seq + r] as usize;
    let (first, table) = (m[at + 3] as usize, m[at + 4] as usize);
    let rel = k - first;
    m[o.tables + table + rel / b.block_size] as usize * b.block_size + rel % b.block_size
}

/// The CPU reference of the kernel: per row and head, scores in f32 over the visible keys,
/// softmax in f32, weighted values.
fn cpu_attention<T: Elem>(q: &[T], k: &[T], v: &[T], b: &PagedBatch, d: AttnDims) -> Vec<T> {
    use rayon::prelude::*;
    let (total, nh, kvh, hd) = (b.total, d.heads, d.kv_heads, d.head_dim);
    let group = nh / kvh;
    let mut out = vec![T::from(0.0); total * nh * hd];
    out.par_chunks_mut(nh * hd)
        .enumerate()
        .for_each(|(r, row)| {
            let KeyRange { lo, hi } = key_range(b, r);
            let keys: Vec<(usize, usize)> = (lo..hi)
                .filter(|&kp| visible(b, r, kp))
                .map(|kp| (kp, key_slot(b, r, kp)))
                .collect();
            let mut p = vec![0f32; keys.len()];
            for h in 0..nh {
                let g = h / group;
                let qh = &q[(h * total + r) * hd..(h * total + r + 1) * hd];
                for (j, &(_, slot)) in keys.iter().enumerate() {
                    let kr = &k[(slot * kvh + g) * hd..(slot * kvh + g + 1) * hd];
                    let dot: f32 = qh.iter().zip(kr).map(|(a, b)| a.f() * b.f()).sum();
                    p[j] = dot * d.scale;
                }
                let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in p.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let mut acc = vec![0f32; hd];
                for (j, &(_, slot)) in keys.iter().enumerate() {
                    let vr = &v[(slot * kvh + g) * hd..(slot * kvh + g + 1) * hd];
                    let w = p[j] / sum;
                    for (a, x) in acc.iter_mut().zip(vr) {
                        *a += w * x.f();
                    }
                }
                for (o, a) in row[h * hd..(h + 1) * hd].iter_mut().zip(acc) {
                    *o = T::from(a);
                }
            }
        });
    out
}

impl candle_core::CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "medgemma-paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims;
        check_shapes(l1, l2, l3, self.b, d)?;
        let shape = Shape::from((self.b.total, d.heads, d.head_dim));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(cpu_attention(
                    contiguous(q, l1, "paged-attention")?,
                    contiguous(k, l2, "paged-attention")?,
                    contiguous(v, l3, "paged-attention")?,
                    self.b,
                    d,
                ))
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(cpu_attention(
                    contiguous(q, l1, "paged-attention")?,
                    contiguous(k, l2, "paged-attention")?,
                    contiguous(v, l3, "paged-attention")?,
                    self.b,
                    d,
                ))
            }
            _ => candle_core::bail!("paged attention: q and the pools must be f32 or bf16"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        check_shapes(l1, l2, l3, self.b, self.dims)?;
        crate::paged_cuda::attention(s1, l1, s2, l2, s3, l3, self.b, self.dims)
    }
}

/// q `[heads, total, head_dim]`, pools `[blocks, block_size, kv_heads, head_dim]`.
pub(crate) fn check_shapes(
    lq: &Layout,
    lk: &Layout,
    lv: &Layout,
    b: &PagedBatch,
    d: AttnDims,
) -> candle_core::Result<()> {
    let (nh, total, hd) = lq.shape().dims3()?;
    let (_, kvh, khd) = pool_dims(lk, b)?;
    if lk.shape() != lv.shape() {
        candle_core::bail!("paged attention: k and v pools differ");
    }
    if (nh, total, hd, kvh, khd) != (d.heads, b.total, d.head_dim, d.kv_heads, d.head_dim) {
        candle_core::bail!(
            "paged attention: q {:?} and pool {:?} do not match the layer",
            lq.shape(),
            lk.shape()
        );
    }
    Ok(())
}

/// The dtypes the kernels take.
pub fn kernel_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => Err(ModelError::Dtype(format!(
            "paged attention runs in f32 or bf16, not {other:?}"
        ))),
    }
}

/// The CUDA source of the paged kernels, compiled at run time by NVRTC (no headers needed:
/// bf16 is converted by bit shifts, as `__bfloat162float` does). One block per (row, head):
/// the query row is staged in shared memory (f32, pre-scaled), the keys are visited in tiles
/// of `blockDim.x` (one key per thread: mask, slot lookup, dot product), and an online softmax
/// keeps a running max and sum while each thread accumulates its share of the output dims.
pub const KERNELS: &str = r#"
typedef unsigned int u32;
typedef unsigned short u16;
// NVRTC has no math headers: -inf by its bits.
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float ld(const float* p, u32 i) { return p[i]; }
__device__ __forceinline__ float ld(const u16* p, u32 i) {
    return __uint_as_float(((u32)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, u32 i, float x) { p[i] = x; }
__device__ __forceinline__ void st(u16* p, u32 i, float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) { p[i] = (u16)((b >> 16) | 0x40u); return; }
    b += 0x7fffu + ((b >> 16) & 1u);
    p[i] = (u16)(b >> 16);
}

template <typename T>
__device__ void kv_write(const T* rows, T* pool, const u32* slots, u32 total, u32 kvh, u32 hd) {
    const u32 r = blockIdx.x;
    const u32 width = kvh * hd;
    const unsigned long long dst = (unsigned long long)slots[r] * width;
    for (u32 i = threadIdx.x; i < width; i += blockDim.x) {
        const u32 g = i / hd, d = i % hd;
        pool[dst + i] = rows[((unsigned long long)g * total + r) * hd + d];
    }
}

extern "C" __global__ void medgemma_kv_write_f32(const float* rows, float* pool,
        const u32* slots, u32 total, u32 kvh, u32 hd) {
    kv_write(rows, pool, slots, total, kvh, hd);
}
extern "C" __global__ void medgemma_kv_write_bf16(const u16* rows, u16* pool,
        const u32* slots, u32 total, u32 kvh, u32 hd) {
    kv_write(rows, pool, slots, total, kvh, hd);
}

#define MAX_PER_THREAD 4

__device__ float block_reduce(float x, float* scratch, bool is_max) {
    const u32 t = threadIdx.x;
    scratch[t] = x;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) {
            float a = scratch[t], b = scratch[t + s];
            scratch[t] = is_max ? fmaxf(a, b) : a + b;
        }
        __syncthreads();
    }
    float r = scratch[0];
    __syncthreads();
    return r;
}

template <typename T>
__device__ void paged_attention(
        const T* q, const T* kpool, const T* vpool, T* out, const u32* meta,
        u32 total, u32 nh, u32 kvh, u32 hd, u32 bs, u32 window, float scale,
        u32 o_seq, u32 o_pos, u32 o_group, u32 o_seqs, u32 o_tables) {
    extern __shared__ float smem[];
    const u32 nt = blockDim.x;
    float* qs = smem;
    float* ps = smem + hd;
    u32* slot = (u32*)(ps + nt);
    float* scratch = (float*)(slot + nt);

    const u32 r = blockIdx.x, h = blockIdx.y, t = threadIdx.x;
    const u32 g = h / (nh / kvh);
    const u32 s = meta[o_seq + r];
    const u32 pos = meta[o_pos + r];
    const u32 grp = meta[o_group + r];
    const u32* sq = meta + o_seqs + 5u * s;
    const u32 off = sq[0], n = sq[1], start = sq[2], first = sq[3];
    const u32* table = meta + o_tables + sq[4];

    u32 lo = first;
    if (window > 0u && pos + 1u > window && pos + 1u - window > lo) lo = pos + 1u - window;
    const u32 hi = grp != 0u ? start + n : pos + 1u;

    for (u32 d = t; d < hd; d += nt) {
        qs[d] = ld(q, ((unsigned long long)h * total + r) * hd + d) * scale;
    }
    __syncthreads();

    float acc[MAX_PER_THREAD];
    for (int i = 0; i < MAX_PER_THREAD; ++i) acc[i] = 0.f;
    float m = NEG_INF, l = 0.f;

    for (u32 t0 = lo; t0 < hi; t0 += nt) {
        const u32 k = t0 + t;
        float sc = NEG_INF;
        u32 sl = 0u;
        if (k < hi) {
            bool vis = (window == 0u || pos < k + window) &&
                (k <= pos || (grp != 0u && k >= start && meta[o_group + off + (k - start)] == grp));
            if (vis) {
                const u32 rel = k - first;
                sl = table[rel / bs] * bs + rel % bs;
                const T* kr = kpool + ((unsigned long long)sl * kvh + g) * hd;
                float dot = 0.f;
                for (u32 d = 0; d < hd; ++d) dot += qs[d] * ld(kr, d);
                sc = dot;
            }
        }
        ps[t] = sc;
        slot[t] = sl;
        const float tmax = block_reduce(sc, scratch, true);
        if (tmax == NEG_INF) continue;
        const float mnew = fmaxf(m, tmax);
        const float corr = __expf(m - mnew);
        const float p = sc == NEG_INF ? 0.f : __expf(sc - mnew);
        ps[t] = p;
        const float tsum = block_reduce(p, scratch, false);
        l = l * corr + tsum;
        m = mnew;
        const u32 tile = min(nt, hi - t0);
        for (int i = 0; i < MAX_PER_THREAD; ++i) {
            const u32 d = t + (u32)i * nt;
            if (d >= hd) break;
            float a = acc[i] * corr;
            for (u32 j = 0; j < tile; ++j) {
                const float pj = ps[j];
                if (pj != 0.f) {
                    a += pj * ld(vpool, ((unsigned long long)slot[j] * kvh + g) * hd + d);
                }
            }
            acc[i] = a;
        }
        __syncthreads();
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int i = 0; i < MAX_PER_THREAD; ++i) {
        const u32 d = t + (u32)i * nt;
        if (d >= hd) break;
        st(out, ((unsigned long long)r * nh + h) * hd + d, acc[i] * inv);
    }
}

#define PAGED_ARGS u32 total, u32 nh, u32 kvh, u32 hd, u32 bs, u32 window, float scale, \
    u32 o_seq, u32 o_pos, u32 o_group, u32 o_seqs, u32 o_tables
#define PAGED_PASS total, nh, kvh, hd, bs, window, scale, o_seq, o_pos, o_group, o_seqs, o_tables

extern "C" __global__ void medgemma_paged_attention_f32(const float* q, const float* k,
        const float* v, float* out, const u32* meta, PAGED_ARGS) {
    paged_attention(q, k, v, out, meta, PAGED_PASS);
}
extern "C" __global__ void medgemma_paged_attention_bf16(const u16* q, const u16* k,
        const u16* v, u16* out, const u32* meta, PAGED_ARGS) {
    paged_attention(q, k, v, out, meta, PAGED_PASS);
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_cover_rows_heads_and_shared_memory() {
        // A decode step of 64 sequences of MedGemma 4B (8 heads, head_dim 256).
        let s = attention_launch(64, 8, 256).unwrap();
        assert_eq!(s.grid, (64, 8, 1));
        assert_eq!(s.block, (ATTN_THREADS, 1, 1));
        assert_eq!(s.shared_bytes as usize, (256 + 3 * 128) * 4);
        // Each thread owns at most MAX_PER_THREAD (4) output dims.
        assert!(MAX_HEAD_DIM <= 4 * ATTN_THREADS as usize);
        // 27B: 32 heads of 128, a 512-row prefill chunk.
        assert_eq!(attention_launch(512, 32, 128).unwrap().grid, (512, 32, 1));
        assert!(attention_launch(0, 8, 256).is_err());
        assert!(attention_launch(1, 8, 1024).is_err());
        assert!(attention_launch(1, 70_000, 128).is_err());
        let w = write_launch(64, 4, 256).unwrap();
        assert_eq!((w.grid, w.block), ((64, 1, 1), (WRITE_THREADS, 1, 1)));
        assert_eq!(write_launch(3, 1, 64).unwrap().block, (64, 1, 1));
        assert!(write_launch(0, 1, 64).is_err());
    }

    fn batch(window: usize) -> PagedBatch {
        // Sequence 0: decode row at position 9, table from position 0 (blocks 3, 1, 4; bs 4).
        // Sequence 1: prefill of 6 rows at positions 4..10 with an image at rows 1..4, table
        // from position 4 (blocks 0, 2).
        let g0 = [None];
        let g1 = [None, Some(1), Some(1), Some(1), None, None];
        PagedBatch::build(
            &[
                SeqPlan {
                    offset: 0,
                    n: 1,
                    start: 9,
                    groups: &g0,
                    first: 0,
                    table: vec![3, 1, 4],
                },
                SeqPlan {
                    offset: 1,
                    n: 6,
                    start: 4,
                    groups: &g1,
                    first: 4,
                    table: vec![0, 2],
                },
            ],
            window,
            4,
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn metadata_slots_and_masks() {
        let b = batch(0);
        assert_eq!(b.total, 7);
        // Row 0: position 9 = block index 2 (id 4), row 1 -> slot 17.
        assert_eq!(b.slots[0], 17);
        // Sequence 1: positions 4..10 from block 0 (4..8) then block 2 (8..12).
        assert_eq!(&b.slots[1..], &[0, 1, 2, 3, 8, 9]);
        assert_eq!(key_range(&b, 0), KeyRange { lo: 0, hi: 10 });
        // Image rows see to the end of the new rows; text rows to themselves.
        assert_eq!(key_range(&b, 2), KeyRange { lo: 4, hi: 10 });
        assert_eq!(key_range(&b, 1), KeyRange { lo: 4, hi: 5 });
        // Row 2 (position 5, image) sees position 7 (same image) but not 8 (text after it).
        assert!(visible(&b, 2, 7) && !visible(&b, 2, 8));
        assert!(!visible(&b, 1, 5), "text row before the image is causal");
        assert!(visible(&b, 6, 6) && visible(&b, 6, 9) && !visible(&b, 5, 9));
        assert_eq!(key_slot(&b, 0, 0), 12);
        assert_eq!(key_slot(&b, 0, 5), 5);
    }

    #[test]
    fn sliding_window_bounds_the_keys() {
        let b = batch(3);
        // Position 9 with window 3 sees 7, 8, 9 (q - k < W).
        assert_eq!(key_range(&b, 0), KeyRange { lo: 7, hi: 10 });
        assert!(!visible(&b, 0, 6) && visible(&b, 0, 7));
        // Image row at position 5 sees 7 (same image, inside the window: 5 < 7 + 3).
        assert!(visible(&b, 2, 7));
        // Position 9 (row 6) does not see 6 (9 - 6 = 3 = W).
        assert!(!visible(&b, 6, 6) && visible(&b, 6, 7));
    }

    #[test]
    fn inconsistent_tables_are_refused() {
        let g = [None, None];
        let e = PagedBatch::build(
            &[SeqPlan {
                offset: 0,
                n: 2,
                start: 7,
                groups: &g,
                first: 0,
                table: vec![0],
            }],
            0,
            4,
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(e.to_string().contains("block table"), "{e}");
    }

    /// The op on the CPU against a direct computation over a dense KV: every key written
    /// through the write op, read back through the block tables.
    #[test]
    fn cpu_op_matches_dense_attention() -> Result<()> {
        let b = batch(0);
        let (nh, kvh, hd) = (4, 2, 8);
        let dims = AttnDims {
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            scale: 0.5,
        };
        let k_pool = Tensor::zeros((5, 4, kvh, hd), DType::F32, &Device::Cpu)?;
        let v_pool = Tensor::zeros((5, 4, kvh, hd), DType::F32, &Device::Cpu)?;
        // Cached rows of sequence 0 (positions 0..9) written through a prefill batch first.
        let g9 = [None; 9];
        let pre = PagedBatch::build(
            &[SeqPlan {
                offset: 0,
                n: 9,
                start: 0,
                groups: &g9,
                first: 0,
                table: vec![3, 1, 4],
            }],
            0,
            4,
            &Device::Cpu,
        )?;
        let f = |n: usize, seed: f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..kvh * n * hd)
                .map(|i| (i as f32 * 0.37 + seed).sin())
                .collect();
            Ok(Tensor::from_vec(v, (kvh, n, hd), &Device::Cpu)?)
        };
        let (k0, v0) = (f(9, 0.1)?, f(9, 0.2)?);
        write_rows(&k_pool, &k0, &pre)?;
        write_rows(&v_pool, &v0, &pre)?;
        let (k1, v1) = (f(7, 0.3)?, f(7, 0.4)?);
        write_rows(&k_pool, &k1, &b)?;
        write_rows(&v_pool, &v1, &b)?;
        let q: Vec<f32> = (0..nh * 7 * hd).map(|i| (i as f32 * 0.11).cos()).collect();
        let q = Tensor::from_vec(q, (nh, 7, hd), &Device::Cpu)?;
        let out = attention(&q, &k_pool, &v_pool, &b, dims)?;
        assert_eq!(out.dims(), &[7, nh, hd]);
        // Dense reference for row 0 head 3 (kv head 1): keys 0..9 from k0, 9 from k1 row 0.
        let kd: Vec<Vec<f32>> = (0..10)
            .map(|p| {
                let (t, i) = if p < 9 { (&k0, p) } else { (&k1, 0) };
                t.get(1).unwrap().get(i).unwrap().to_vec1().unwrap()
            })
            .collect();
        let vd: Vec<Vec<f32>> = (0..10)
            .map(|p| {
                let (t, i) = if p < 9 { (&v0, p) } else { (&v1, 0) };
                t.get(1).unwrap().get(i).unwrap().to_vec1().unwrap()
            })
            .collect();
        let qh: Vec<f32> = q.get(3)?.get(0)?.to_vec1()?;
        let s: Vec<f32> = kd
            .iter()
            .map(|k| qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * 0.5)
            .collect();
        let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
        let z: f32 = e.iter().sum();
        let want: Vec<f32> = (0..hd)
            .map(|d| (0..10).map(|j| e[j] / z * vd[j][d]).sum())
            .collect();
        let got: Vec<f32> = out.get(0)?.get(3)?.to_vec1()?;
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        // bf16 runs the same code.
        let out16 = attention(
            &q.to_dtype(DType::BF16)?,
            &k_pool.to_dtype(DType::BF16)?,
            &v_pool.to_dtype(DType::BF16)?,
            &b,
            dims,
        )?;
        let diff = (out16.to_dtype(DType::F32)? - &out)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 0.05, "bf16 vs f32: {diff}");
        Ok(())
    }
}
