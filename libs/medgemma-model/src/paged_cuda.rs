//! The CUDA side of [`crate::paged`]: the kernels compiled once per process by NVRTC (the
//! PTX is portable; the driver JIT-compiles it for the device at hand, sm_80 and sm_90
//! alike), loaded per device, and launched on candle's stream.
// Kernel launches are foreign calls with raw device pointers: cudarc marks them `unsafe`.
// Every launch here checks its shapes first (`check_shapes`, `pool_dims`, the launch-shape
// functions), so the kernel never reads or writes past the buffers it is given.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::{CudaDevice, CudaStorage, Layout, Shape, Storage};

use crate::paged::{
    AttnDims, LaunchShape, PagedBatch, attention_launch, kernel_suffix, write_launch,
};

const MODULE: &str = "medgemma_paged";

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        nvrtc::compile_ptx(crate::paged::KERNELS)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile the paged attention kernels: {e}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn config(s: LaunchShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: s.grid,
        block_dim: s.block,
        shared_mem_bytes: s.shared_bytes,
    }
}

/// The device buffer of a `u32` metadata tensor (made by `Tensor::from_slice`: contiguous,
/// from offset 0).
fn u32_of(st: &Storage) -> candle_core::Result<&CudaSlice<u32>> {
    match st {
        Storage::Cuda(c) => c.as_cuda_slice::<u32>(),
        _ => candle_core::bail!("paged metadata is not on the CUDA device"),
    }
}

fn view<'a, T: DeviceRepr>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, z)) => Ok(s.slice(a..z)),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

fn dtype_of(s: &CudaStorage) -> candle_core::Result<&'static str> {
    use candle_core::backend::BackendStorage;
    kernel_suffix(s.dtype()).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Writes `rows` (`[kv_heads, total, head_dim]`) into the pool at the batch's slots.
pub(crate) fn write(
    pool: &mut CudaStorage,
    lp: &Layout,
    rows: &CudaStorage,
    lr: &Layout,
    b: &PagedBatch,
) -> candle_core::Result<()> {
    let (_, _, kvh, hd) = lp.shape().dims4()?;
    let (rk, rt, rh) = lr.shape().dims3()?;
    if (rk, rt, rh) != (kvh, b.total, hd) || !lp.is_contiguous() {
        candle_core::bail!("kv write: rows {:?} for pool {:?}", lr.shape(), lp.shape());
    }
    let sfx = dtype_of(pool)?;
    let shape =
        write_launch(b.total, kvh, hd).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let dev: CudaDevice = pool.device.clone();
    let func = dev.get_or_load_custom_func(&format!("medgemma_kv_write_{sfx}"), MODULE, ptx()?)?;
    let (slots_st, _) = b.slots_dev.storage_and_layout();
    let slots = u32_of(&slots_st)?;
    let (total, kvh, hd) = (b.total as u32, kvh as u32, hd as u32);
    let start = lp.start_offset();
    macro_rules! go {
        ($t:ty) => {{
            let r = view(rows.as_cuda_slice::<$t>()?, lr, "kv-write")?;
            let p = pool.as_cuda_slice_mut::<$t>()?;
            let mut p = p.slice_mut(start..);
            let mut builder = func.builder();
            builder.arg(&r);
            builder.arg(&mut p);
            builder.arg(slots);
            builder.arg(&total);
            builder.arg(&kvh);
            builder.arg(&hd);
            // SAFETY: the launch covers `total` rows of `kvh * hd` elements; every slot is a
            // block of the pool handed out by the KV cache (below its capacity).
            unsafe { builder.launch(config(shape)) }.w()?;
        }};
    }
    if sfx == "bf16" {
        go!(half::bf16)
    } else {
        go!(f32)
    }
    Ok(())
}

/// The attention kernel over every packed row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    b: &PagedBatch,
    d: AttnDims,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let sfx = dtype_of(q)?;
    let shape = attention_launch(b.total, d.heads, d.head_dim)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let dev: CudaDevice = q.device.clone();
    let func =
        dev.get_or_load_custom_func(&format!("medgemma_paged_attention_{sfx}"), MODULE, ptx()?)?;
    let (meta_st, _) = b.meta_dev.storage_and_layout();
    let meta = u32_of(&meta_st)?;
    let o = b.offsets;
    let scalars = [
        b.total as u32,
        d.heads as u32,
        d.kv_heads as u32,
        d.head_dim as u32,
        b.block_size as u32,
        b.window as u32,
    ];
    let offs = [
        o.row_seq as u32,
        o.row_pos as u32,
        o.row_group as u32,
        o.seqs as u32,
        o.tables as u32,
    ];
    let n = b.total * d.heads * d.head_dim;
    macro_rules! go {
        ($t:ty) => {{
            let qv = view(q.as_cuda_slice::<$t>()?, lq, "paged-attention")?;
            let kv = view(k.as_cuda_slice::<$t>()?, lk, "paged-attention")?;
            let vv = view(v.as_cuda_slice::<$t>()?, lv, "paged-attention")?;
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut builder = func.builder();
            builder.arg(&qv);
            builder.arg(&kv);
            builder.arg(&vv);
            builder.arg(&out);
            builder.arg(meta);
            for s in &scalars {
                builder.arg(s);
            }
            builder.arg(&d.scale);
            for s in &offs {
                builder.arg(s);
            }
            // SAFETY: shapes checked by `check_shapes` and `attention_launch`; the metadata
            // was built by `PagedBatch::build` against the same block tables.
            unsafe { builder.launch(config(shape)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = if sfx == "bf16" {
        go!(half::bf16)
    } else {
        go!(f32)
    };
    Ok((out, Shape::from((b.total, d.heads, d.head_dim))))
}
