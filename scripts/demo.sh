#!/usr/bin/env bash
# The README's first command: the whole suite on this machine with `medgemma up --once`.
# Fetches the demo model (gemma-3-270m Q4_K_M) and the Gemma 3 tokenizer, starts the tokenizer,
# vision, generator (text and multimodal pools) and gateway services on loopback in one process,
# runs the four clinical tasks once through the gateway over gRPC, prints the typed results and
# exits (non-zero if a task failed).
#   scripts/demo.sh --serve      keep serving after the demo (Ctrl-C stops), for `medgemma ask ...`
#   scripts/demo.sh generate ... the single-prompt engine demo (`medgemma generate`)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"
cargo build -q --locked -p medgemma-cli
bin="$CARGO_TARGET_DIR/debug/medgemma"
case "${1:-}" in
  --serve)
    shift
    exec "$bin" up "$@"
    ;;
  generate)
    shift
    "$bin" fetch-demo >/dev/null
    gguf=$("$bin" fetch-demo --print-paths | awk -F'\t' '$1=="gguf"{print $2}')
    tok=$("$bin" fetch-demo --print-paths | awk -F'\t' '$1=="tokenizer_json"{print $2}')
    exec "$bin" generate --model "$gguf" --tokenizer "$(dirname "$tok")" \
      --system "You are a medical AI assistant. Provide accurate, evidence-based information." \
      --prompt "${1:-What are the first-line treatments for Type 2 diabetes?}" \
      --max-new-tokens "${MAX_NEW_TOKENS:-96}"
    ;;
  *)
    exec "$bin" up --once "$@"
    ;;
esac
