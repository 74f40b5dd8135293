#!/usr/bin/env bash
# Supply chain (run by scripts/test.sh): cargo deny check — advisories, licenses, bans,
# sources — with deny.toml, offline. cargo-deny is installed once from crates.io (pinned,
# --locked) under the cache; the RustSec advisory database is the snapshot committed under
# tools/supply-chain/ (CI cannot reach GitHub), sha256-checked, dated by its commit so that
# deny.toml's maximum-db-staleness fails CI when it gets old (refresh: scripts/update-advisory-db.sh).
# Cost: ~6 min once to compile cargo-deny on 2 cores, then ~10 s per run.
set -euo pipefail
cd "$(dirname "$0")/.."
deny_version=0.20.2
# The snapshot: rustsec/advisory-db at this commit, committed on this date.
db_commit=bf5c0d245a92
db_date=2026-08-21T08:28:40+02:00
db_sha256=4b07d7596238d19b8c37e347edb67abfbd009fa3a38359c2e7cf9dc148c643c3
tools="${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}/tools"
deny="$tools/cargo-deny-$deny_version/bin/cargo-deny"
if [ ! -x "$deny" ]; then
  CARGO_TARGET_DIR="$tools/cargo-deny-build" \
    cargo install -q --locked --root "$tools/cargo-deny-$deny_version" cargo-deny --version "$deny_version"
  rm -rf "$tools/cargo-deny-build"
fi
archive="tools/supply-chain/advisory-db-$db_commit.tar.gz"
echo "$db_sha256  $archive" | sha256sum -c --quiet -
# deny.toml reads the database from ~/.cache/medgemma/advisory-db; the directory name is
# cargo-deny's for the db-urls entry.
db="$HOME/.cache/medgemma/advisory-db/advisory-db-3157b0e258782691"
if [ "$(cat "$db/.snapshot" 2>/dev/null)" != "$db_commit" ]; then
  rm -rf "$db"
  mkdir -p "$db"
  tar -xzf "$archive" -C "$db" --strip-components=1
  git init -q "$db"
  # cargo-deny dates a database by .git/FETCH_HEAD: the snapshot's commit date.
  touch -d "$db_date" "$db/.git/FETCH_HEAD"
  echo "$db_commit" > "$db/.snapshot"
fi
"$deny" --offline --locked check --show-stats advisories licenses bans sources
