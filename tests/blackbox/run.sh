#!/usr/bin/env bash
# Black-box test of the whole suite from a non-Rust client: starts `medgemma up` (all four
# services on loopback, no --once), then tests/blackbox/check.py (Python grpcio + reflection +
# health, installed into a cache directory outside the clone) checks health, reflection, the
# four tasks and bad requests; finally SIGTERM must end `medgemma up` within 10 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
cache="${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}"

# Python client, pinned, outside the clone.
venv="$cache/blackbox-venv"
if ! "$venv/bin/python" -c "import grpc, grpc_reflection, grpc_health" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    grpcio==1.85.1 grpcio-reflection==1.85.1 grpcio-health-checking==1.85.1
fi

cargo build -q --locked -p medgemma-cli
bin="$CARGO_TARGET_DIR/debug/medgemma"

work=$(mktemp -d)
up_pid=""
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -KILL "$up_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Free ports for every service: the checker reads the addresses from the log.
"$bin" up --gateway-listen 127.0.0.1:0 --demo-max-new-tokens 16 >"$work/up.log" 2>"$work/up.err" &
up_pid=$!

# The demo runs once before `demo done`; then it keeps serving.
for _ in $(seq 1 600); do
  if grep -q '^demo done' "$work/up.log"; then break; fi
  if ! kill -0 "$up_pid" 2>/dev/null; then
    echo "medgemma up exited early:" >&2
    cat "$work/up.log" "$work/up.err" >&2
    exit 1
  fi
  sleep 1
done
if ! grep -q '^demo done' "$work/up.log"; then
  echo "medgemma up did not finish its demo within 600 s" >&2
  cat "$work/up.log" "$work/up.err" >&2
  exit 1
fi

status=0
"$venv/bin/python" tests/blackbox/check.py "$work/up.log" || status=$?

# SIGTERM: drain and exit within 10 s.
start=$(date +%s)
kill -TERM "$up_pid"
exited=0
for _ in $(seq 1 100); do
  if ! kill -0 "$up_pid" 2>/dev/null; then exited=1; break; fi
  sleep 0.1
done
elapsed=$(( $(date +%s) - start ))
if [ "$exited" = 1 ]; then
  rc=0
  wait "$up_pid" || rc=$?
  up_pid=""
  echo "ok   SIGTERM: medgemma up exited in ${elapsed}s (status $rc)"
  if [ "$rc" != 0 ]; then
    echo "FAIL SIGTERM: non-zero exit status $rc" >&2
    cat "$work/up.err" >&2
    status=1
  fi
else
  echo "FAIL SIGTERM: medgemma up still running after 10 s" >&2
  status=1
fi
if [ "$status" != 0 ]; then
  echo "--- medgemma up stderr ---" >&2
  tail -50 "$work/up.err" >&2
fi
exit "$status"
