#!/usr/bin/env python3
"""Compiles the paged-attention kernels (the `KERNELS` source in
libs/medgemma-model/src/paged.rs) with NVRTC, as the CUDA build does at start-up, and checks
that every kernel the Rust side launches is in the PTX. Needs no GPU: only libnvrtc from the
CUDA toolkit wheels (tools/cuda/env.sh). Run by tools/device/check.sh, dry run included.

    python3 tools/device/nvrtc_check.py --nvrtc $CUDA_ROOT/lib/libnvrtc.so.13 [--arch compute_80]
"""
import argparse
import ctypes
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ["medgemma_kv_write_f32", "medgemma_kv_write_bf16",
           "medgemma_paged_attention_f32", "medgemma_paged_attention_bf16"]


def source():
    text = (ROOT / "libs/medgemma-model/src/paged.rs").read_text()
    m = re.search(r'pub const KERNELS: &str = r#"(.*?)"#;', text, re.S)
    if not m:
        sys.exit("no KERNELS source in paged.rs")
    return m.group(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", required=True)
    ap.add_argument("--arch", action="append", default=None)
    a = ap.parse_args()
    lib = ctypes.CDLL(a.nvrtc)
    src = source().encode()
    for arch in a.arch or ["compute_80", "compute_90"]:
        prog = ctypes.c_void_p()
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"paged.cu", 0, None, None)
        assert rc == 0, f"nvrtcCreateProgram: {rc}"
        opts = [f"--gpu-architecture={arch}".encode()]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            print(log.value.decode(), file=sys.stderr)
            sys.exit(f"NVRTC failed for {arch} (code {rc})")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        text = ptx.value.decode()
        missing = [k for k in KERNELS if f".entry {k}(" not in text]
        if missing:
            sys.exit(f"{arch}: kernels missing from the PTX: {missing}")
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        print(f"nvrtc {arch}: {len(text)} bytes of PTX, kernels {', '.join(KERNELS)}")


if __name__ == "__main__":
    main()
