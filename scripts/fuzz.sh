#!/usr/bin/env bash
# Runs every cargo-fuzz (libFuzzer) target in fuzz/ for SECONDS each (default 300), from the
# committed seeds in fuzz/corpus/<target>. cargo-fuzz comes from crates.io, pinned, installed
# once into the cache outside the clone; it needs nightly flags, which RUSTC_BOOTSTRAP=1 allows
# on the pinned stable toolchain. A crash leaves its input in fuzz/artifacts/<target>/: make it
# a regression seed in fuzz/corpus/<target>/ (the ordinary tests replay every seed), then fix.
# MEDGEMMA_FUZZ_SANITIZER (default address) picks cargo-fuzz's sanitizer; `none` builds and runs
# faster (scripts/test.sh uses it for its bounded run). One instrumented build serves every
# target; it lives outside the clone (MEDGEMMA_FUZZ_TARGET_DIR).
#   scripts/fuzz.sh            # 5 minutes per target
#   scripts/fuzz.sh 60 dicom   # one target, 60 s
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-300}"
shift || true
version=0.13.1
root="${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}/tools/cargo-fuzz-$version"
if [ ! -x "$root/bin/cargo-fuzz" ]; then
  cargo install -q --locked --root "$root" "cargo-fuzz@$version"
fi
export PATH="$root/bin:$PATH" RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${MEDGEMMA_FUZZ_TARGET_DIR:-$HOME/.cache/medgemma-serve/fuzz-target}"
sanitizer="${MEDGEMMA_FUZZ_SANITIZER:-address}"
# The fuzz workspace's lock file must match its manifest (as --locked does for the main one).
cargo metadata -q --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
  # Every target in one cargo build (`cargo fuzz run` below then finds them built).
  cargo fuzz build --fuzz-dir fuzz -s "$sanitizer"
fi
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  # A scratch corpus (new inputs go there), seeded from the committed one.
  work=$(mktemp -d)
  cp -r "fuzz/corpus/$t/." "$work/"
  echo "fuzz: $t for ${seconds}s"
  cargo fuzz run --fuzz-dir fuzz -s "$sanitizer" "$t" "$work" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
  rm -rf "$work"
done
