#!/usr/bin/env bash
# The project's test command (README, and what .ci/run calls): fetches the demo assets, then
# formatting, lints and every test. Hermetic apart from the one-time asset download.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
export MEDGEMMA_REQUIRE_ASSETS="${MEDGEMMA_REQUIRE_ASSETS:-1}"
cargo fmt --all --check
# Supply chain: cargo deny (advisories from the committed RustSec snapshot, licenses, bans,
# sources); ~10 s, plus ~6 min once to install cargo-deny into the cache.
bash scripts/cargo-deny.sh
# Proto lint (buf from npm, pinned, installed once into the cache, outside the clone).
buf_version=1.75.0
buf_dir="${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}/tools/buf-$buf_version"
if [ ! -x "$buf_dir/node_modules/.bin/buf" ]; then
  npm install -s --no-audit --no-fund --prefix "$buf_dir" "@bufbuild/buf@$buf_version"
fi
# The linux-x64 binary npm installed, checked against its pinned sha256 (x86-64 Linux CI).
buf_bin="$buf_dir/node_modules/@bufbuild/buf-linux-x64/bin/buf"
echo "fad1e38d6909bbb583a4da81d8c02a01046e2cd663bde7e337dd24277393764b  $buf_bin" | sha256sum -c --quiet -
"$buf_bin" lint proto
cargo run -q --locked -p medgemma-cli -- fetch-demo
# Real DICOM radiographs for the vision tests (PyPI pydicom-data, pinned; sha256-checked by
# the tests themselves).
dicom_dir="${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}/demo/pydicom-data"
if [ ! -f "$dicom_dir/eCT_Supplemental.dcm" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps pydicom-data==1.0.0 -d "$tmp"
  echo "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637  $tmp/pydicom_data-1.0.0-py3-none-any.whl" |
    sha256sum -c --quiet -
  mkdir -p "$dicom_dir"
  python3 - "$tmp" "$dicom_dir" <<'PY'
import glob, os, sys, zipfile
want = {"RG1_UNCI.dcm", "RG1_J2KR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "eCT_Supplemental.dcm"}
with zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]) as z:
    for n in z.namelist():
        if os.path.basename(n) in want:
            with open(os.path.join(sys.argv[2], os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
  rm -rf "$tmp"
fi
bash scripts/check-deploy.sh  # deploy/: hadolint, Helm renders, schemas, checkov, chart tests
bash scripts/check-observability.sh  # deploy/observability: promtool rules + unit tests, dashboard names (~5 s + apt once)
cargo clippy --locked --workspace --all-targets -- -D warnings
# The observability test (services/medgemma-suite/tests/observability.rs) runs these four as
# separate processes from the target directory.
cargo build -p medgemma-gateway -p medgemma-generator -p medgemma-tokenizer-service \
  -p medgemma-vision-service --bins --locked
# Includes services/medgemma-cli/tests/mtls.rs: the security suite with every service its own
# process (~25 s).
cargo test --locked --workspace
# The vision tower again without our SIMD kernels (no fused attention, portable softmax/GELU):
# the path CPUs without AVX-512 take, pinned to the same transformers goldens.
MEDGEMMA_CPU_SIMD=0 cargo test --locked -p medgemma-vision --test tower
# libFuzzer, 30 s per target from the committed seeds (fuzz/: its own workspace, built once with
# coverage instrumentation outside the clone: ~5.5 min cold, seconds warm; scripts/fuzz.sh runs
# longer and with AddressSanitizer).
MEDGEMMA_FUZZ_SANITIZER=none bash scripts/fuzz.sh 30
bash scripts/deid-eval.sh
# Black box: `medgemma up` driven from Python grpcio (health, reflection, the four tasks, bad
# requests, SIGTERM).
bash tests/blackbox/run.sh
# The CUDA build, without a GPU: tools/cuda/env.sh's pinned toolkit wheels (PyPI, ~1.2 GB,
# cached under $MEDGEMMA_CACHE_DIR/tools), `cargo clippy --features cuda` in this target
# directory (only what the cuda feature changes is checked again: candle with cudarc, the
# kernels' PTX for sm_90, our crates; seconds warm), then the device check's CPU steps
# (tools/device/check.sh --dry-run).
bash tools/device/check.sh --dry-run --out "$(mktemp -d)"
