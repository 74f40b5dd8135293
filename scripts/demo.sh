#!/usr/bin/env bash
# The main job on the embedded default: fetch the demo model (gemma-3-270m Q4_K_M) and the
# Gemma 3 tokenizer, then answer a clinical question with `medgemma generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
cargo build -q -p medgemma-cli
bin="$CARGO_TARGET_DIR/debug/medgemma"
"$bin" fetch-demo >/dev/null
gguf=$("$bin" fetch-demo --print-paths | awk -F'\t' '$1=="gguf"{print $2}')
tok=$("$bin" fetch-demo --print-paths | awk -F'\t' '$1=="tokenizer_json"{print $2}')
"$bin" generate --model "$gguf" --tokenizer "$(dirname "$tok")" \
  --system "You are a medical AI assistant. Provide accurate, evidence-based information." \
  --prompt "${1:-What are the first-line treatments for Type 2 diabetes?}" \
  --max-new-tokens "${MAX_NEW_TOKENS:-96}"
