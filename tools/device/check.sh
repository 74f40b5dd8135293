#!/usr/bin/env bash
# The GPU device check (README, GPU): on a machine with one NVIDIA GPU and nothing else
# prepared, in about 10 minutes:
#   1. the CUDA toolkit (an installed one, else tools/cuda/env.sh's pinned PyPI wheels) and a
#      build with --features cuda for this GPU's compute capability;
#   2. the tiny-model parity tests on CUDA (libs/medgemma-model/tests/paged.rs with
#      MEDGEMMA_TEST_DEVICE=cuda: f32 logits within 1e-3 of the committed transformers goldens,
#      bf16 greedy tokens equal to the bf16 goldens), and the device-selection tests;
#   3. `medgemma bench-device`: a full-size MedGemma-4B-shaped decoder with seeded random
#      weights, prefill and decode at batch 1, 8 and 64, the achieved fraction of the memory
#      bandwidth in decode, the full-size SigLIP tower; beside transformers on the same
#      weights when torch with CUDA is importable (MEDGEMMA_TORCH_PYTHON, else python3).
# Results: OUT/bench.json, OUT/bench.md, OUT/summary.md and the logs (default OUT:
# ./device-check-<date>).
#
#   tools/device/check.sh [--out DIR] [--dry-run]
#
# --dry-run (CI, no GPU): every step but the device ones: the toolkit is installed and the
# CUDA build passes clippy (--features cuda, candle-kernels' PTX compiled), NVRTC compiles
# our kernels, the CPU tests of what is CUDA-specific run, and the benchmark runs its whole
# pipeline on the CPU on a tiny shape, writing the same files.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

dry=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: tools/device/check.sh [--out DIR] [--dry-run]" >&2; exit 2 ;;
  esac
  shift
done
out="${out:-$root/device-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
summary="$out/summary.md"
: >"$summary"
step() { echo "== $*" | tee -a "$summary" >&2; }
note() { echo "$*" | tee -a "$summary" >&2; }

# Rust: the pinned toolchain (rust-toolchain.toml), through rustup when it is missing.
if ! command -v cargo >/dev/null; then
  step "installing Rust (rustup, minimal profile)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

# The GPU: its name, memory and compute capability (nvidia-smi ships with the driver).
if [ "$dry" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "no nvidia-smi: this machine has no NVIDIA driver (use --dry-run without a GPU)" >&2
    exit 1
  fi
  gpu=$(nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader | head -1)
  note "GPU: $gpu"
  cap=$(echo "$gpu" | awk -F', ' '{print $3}' | tr -d '.')
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
else
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  note "dry run: no GPU used; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
fi

# The CUDA toolkit: one on the machine (nvcc on PATH or /usr/local/cuda) when its version
# is one cudarc knows, else the pinned wheels.
if [ -z "${CUDA_ROOT:-}" ] && command -v nvcc >/dev/null; then
  export CUDA_ROOT
  CUDA_ROOT=$(dirname "$(dirname "$(command -v nvcc)")")
elif [ -z "${CUDA_ROOT:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_ROOT=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
fi
if [ -n "${CUDA_ROOT:-}" ]; then
  export CUDA_PATH="$CUDA_ROOT"
  note "CUDA toolkit: $CUDA_ROOT ($(nvcc --version | tail -1))"
else
  step "CUDA toolkit from PyPI (tools/cuda/requirements.txt)"
  # shellcheck source=/dev/null
  source tools/cuda/env.sh
  note "CUDA toolkit: $CUDA_ROOT"
fi

# Our kernels through NVRTC, as the binaries compile them at start-up (no GPU needed).
nvrtc=$(find -L "$CUDA_ROOT" -name "libnvrtc.so*" 2>/dev/null | sort | head -1)
step "NVRTC compiles the paged-attention kernels ($nvrtc)"
python3 tools/device/nvrtc_check.py --nvrtc "$nvrtc" 2>&1 | tee "$out/nvrtc.log" >&2

# The dry run (CI) checks in the CPU build's target directory: every dependency the cuda
# feature does not touch is already checked there by the CPU clippy, and the cuda feature's
# artifacts (other feature hashes) sit beside the CPU ones without invalidating them. The device
# run builds release binaries in a directory of its own.
CPU_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
if [ "$dry" = 1 ]; then
  export CARGO_TARGET_DIR="${MEDGEMMA_CUDA_TARGET_DIR:-${MEDGEMMA_CPU_TARGET_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}}}"
else
  export CARGO_TARGET_DIR="${MEDGEMMA_CUDA_TARGET_DIR:-$HOME/.cache/medgemma-serve/target-cuda}"
fi
export MEDGEMMA_REQUIRE_ASSETS=0

if [ "$dry" = 1 ]; then
  step "cargo clippy --workspace --all-targets --features cuda -- -D warnings"
  t0=$(date +%s)
  cargo clippy -q --workspace --all-targets --features cuda -- -D warnings 2>&1 | tee "$out/check.log" >&2
  note "cuda check: ok ($(( $(date +%s) - t0 )) s)"
  # The CPU build of what is CUDA-specific: launch shapes, metadata, masks, memory planning,
  # device selection (no GPU: a clear error), and the paged path on the CPU.
  export CARGO_TARGET_DIR="${MEDGEMMA_CPU_TARGET_DIR:-${CPU_TARGET_DIR}}"
  step "CPU tests of the CUDA-specific code"
  cargo test -q -p medgemma-model --lib -- paged:: memory:: device:: 2>&1 | tee "$out/tests.log" >&2
  cargo test -q -p medgemma-model --test paged 2>&1 | tee -a "$out/tests.log" >&2
  step "bench-device pipeline on the CPU (tiny shape)"
  cargo run -q -p medgemma-cli -- bench-device --shape tiny --device cpu --batches 1,2 \
    --prompt-tokens 16 --decode-steps 4 --model "$out/random-tiny" --out "$out" \
    2>&1 | tee "$out/bench.log" >&2
  test -s "$out/bench.json" && test -s "$out/bench.md"
  rm -rf "$out/random-tiny"
  note "dry run: ok (results in $out)"
  exit 0
fi

step "build --release --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
t0=$(date +%s)
cargo build -q --release --features cuda -p medgemma-cli 2>&1 | tee "$out/build.log" >&2
note "build: $(( $(date +%s) - t0 )) s"

step "tiny-model parity on CUDA"
MEDGEMMA_TEST_DEVICE=cuda cargo test -q --release --features cuda -p medgemma-model \
  --test paged 2>&1 | tee "$out/parity.log" >&2
cargo test -q --release --features cuda -p medgemma-model --lib -- device:: paged:: \
  2>&1 | tee -a "$out/parity.log" >&2
note "parity: ok (f32 logits within 1e-3 of the goldens, bf16 greedy equal)"

model="${MEDGEMMA_BENCH_MODEL_DIR:-$HOME/.cache/medgemma/device-check/random-4b}"
bin="$CARGO_TARGET_DIR/release/medgemma"
step "random 4B-shaped checkpoint in $model"
"$bin" bench-device --model "$model" --write-only --out "$out"

py="${MEDGEMMA_TORCH_PYTHON:-python3}"
theirs=()
if "$py" -c 'import torch, transformers, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  step "transformers on the same weights ($py)"
  "$py" tools/device/bench_transformers.py --model "$model" --batches 1,8,64 \
    --prompt-tokens 512 --decode-steps 32 --out "$out/transformers.json" \
    2>&1 | tee "$out/transformers.log" >&2 && theirs=(--transformers-json "$out/transformers.json")
else
  note "transformers: skipped (no torch with CUDA for $py; set MEDGEMMA_TORCH_PYTHON)"
fi

step "bench-device (batch 1, 8, 64)"
"$bin" bench-device --model "$model" --device cuda --batches 1,8,64 --prompt-tokens 512 \
  --decode-steps 32 --out "$out" "${theirs[@]}" 2>&1 | tee "$out/bench.log" >&2
cat "$out/bench.md" >>"$summary"
note "device check: ok (results in $out)"
