#!/usr/bin/env bash
# What exporting traces costs on the request path: `medgemma bench-serve`'s gateway scenario
# (Ask through the whole in-process suite, one request at a time, greedy, 64 output tokens)
# with export off and with every span exported over OTLP/gRPC to a receiver in the process
# (--otlp-sink), alternated RUNS times (default 5); prints the median output tok/s of each and
# their ratio. Release build; ~1 minute per pair on 2 cores.
#   scripts/bench-telemetry.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
cargo build -q --release --locked -p medgemma-cli
bin="$CARGO_TARGET_DIR/release/medgemma"
out=$(mktemp -d)
for i in $(seq "$runs"); do
  for mode in off on; do
    flag=()
    if [ "$mode" = on ]; then flag=(--otlp-sink); fi
    "$bin" bench-serve --concurrency 1 --requests 2 --prefix-requests 0 --gateway-requests 16 \
      --output-tokens 64 --json "${flag[@]}" 2>/dev/null > "$out/$mode-$i.txt"
    grep -h '^OTLP export' "$out/$mode-$i.txt" || true
  done
done
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys, glob
out, runs = sys.argv[1], int(sys.argv[2])
def result(mode):
    rows = []
    for i in range(1, runs + 1):
        for line in open(f"{out}/{mode}-{i}.txt"):
            if line.startswith("{"):
                rows.append(json.loads(line)["gateway"])
    return rows
off, on = result("off"), result("on")
m_off = statistics.median(r["gateway_tokens_per_s"] for r in off)
m_on = statistics.median(r["gateway_tokens_per_s"] for r in on)
print(f"| export | runs | gateway output tok/s (median) | each run |")
print("|---|---:|---:|---|")
for name, rows, m in (("off", off, m_off), ("on (OTLP to an in-process receiver)", on, m_on)):
    each = ", ".join(f"{r['gateway_tokens_per_s']:.1f}" for r in rows)
    print(f"| {name} | {len(rows)} | {m:.1f} | {each} |")
print(f"export on / off: {m_on / m_off:.3f} ({(1 - m_on / m_off) * 100:+.1f}% slower with export)")
PY
rm -rf "$out"
