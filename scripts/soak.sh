#!/usr/bin/env bash
# The soak of the faults test (services/medgemma-suite/tests/faults.rs) for longer than CI's
# 2 minutes: mixed tasks at 8 in flight through the gateway to two generator replicas, each a
# separate process; prints per process RSS, file descriptors and threads at half time and at
# the end, and fails on RSS growth over 5% or any fd/thread growth.
#   scripts/soak.sh          # 10 minutes
#   scripts/soak.sh 1800     # 30 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
cargo build -q --locked -p medgemma-gateway -p medgemma-generator -p medgemma-tokenizer-service --bins
MEDGEMMA_SOAK_SECS="${1:-600}" cargo test -q --locked -p medgemma-suite --test faults \
  load_soak_and_a_rolling_restart_lose_nothing -- --nocapture 2>&1 |
  grep -v '"level"'
