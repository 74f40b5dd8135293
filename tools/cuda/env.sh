#!/usr/bin/env bash
# The CUDA toolkit for candle's CUDA build (`--features cuda`), from PyPI, pinned in
# tools/cuda/requirements.txt, installed once into a venv under $MEDGEMMA_CACHE_DIR/tools
# (default ~/.cache/medgemma/tools; outside the clone; ~1.2 GB), then put on the paths:
#
#   source tools/cuda/env.sh             # sets the variables in this shell
#   tools/cuda/env.sh cargo check --workspace --features cuda    # or runs one command
#
# Sets CUDA_ROOT/CUDA_PATH/CUDA_HOME, PATH (nvcc), LIBRARY_PATH and LD_LIBRARY_PATH (cuBLAS,
# cuRAND, NVRTC, cudart, and the driver's libcuda when one is installed), CUDA_COMPUTE_CAP
# (default 90: H100/H200; 80 for A100; one capability per build, see the README) and
# CUDARC_CUDA_VERSION (13040: the toolkit's version as cudarc names it). No GPU or driver is
# needed to compile; linking a binary needs the driver's libcuda.so.1.
_medgemma_cuda_main() {
  local here req key venv c link lib
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  req="$here/requirements.txt"
  key=$(grep -v '^#' "$req" | sha256sum | cut -c1-12)
  venv="${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}/tools/cuda-$key"
  if [ ! -f "$venv/.installed" ]; then
    echo "installing the CUDA toolkit wheels (tools/cuda/requirements.txt) into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" || return 1
    touch "$venv/.installed"
  fi
  c=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
  if [ ! -x "$c/bin/nvcc" ]; then
    echo "tools/cuda/env.sh: no nvcc under $c" >&2
    return 1
  fi
  # The wheels ship only versioned libraries (libcublas.so.13); the linker wants the
  # unversioned names, and libcuda comes from the driver (absent on build machines).
  link="$venv/link"
  mkdir -p "$link"
  for lib in "$c"/lib/lib*.so.*; do
    ln -sf "$lib" "$link/$(basename "$lib" | sed 's/\.so\..*/.so/')"
  done
  lib=$(/sbin/ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
  [ -n "$lib" ] && ln -sf "$lib" "$link/libcuda.so"
  export CUDA_ROOT="$c" CUDA_PATH="$c" CUDA_HOME="$c"
  export PATH="$c/bin:$PATH"
  export LIBRARY_PATH="$link${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$c/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export CUDARC_CUDA_VERSION=13040
  export MEDGEMMA_CUDA_VENV="$venv"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  _medgemma_cuda_main
  if [ $# -gt 0 ]; then exec "$@"; fi
  env | grep -E '^(CUDA_ROOT|CUDA_COMPUTE_CAP|CUDARC_CUDA_VERSION|MEDGEMMA_CUDA_VENV)=' >&2
else
  _medgemma_cuda_main
fi
