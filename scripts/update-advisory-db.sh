#!/usr/bin/env bash
# Refreshes the RustSec advisory database snapshot that scripts/cargo-deny.sh checks against
# (CI cannot reach GitHub). Run by hand where GitHub is reachable, then commit:
#   scripts/update-advisory-db.sh [path to a rustsec/advisory-db clone]
# Without a path it clones https://github.com/rustsec/advisory-db into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-}"
if [ -z "$src" ]; then
  src=$(mktemp -d)
  git clone -q --depth 1 https://github.com/rustsec/advisory-db "$src"
fi
commit=$(git -C "$src" rev-parse --short=12 HEAD)
date=$(git -C "$src" show -s --format=%cI HEAD)
out="tools/supply-chain/advisory-db-$commit.tar.gz"
git rm -q --ignore-unmatch tools/supply-chain/advisory-db-*.tar.gz
mkdir -p tools/supply-chain
git -C "$src" archive --format=tar --prefix=advisory-db/ HEAD crates LICENSE.txt | gzip -9n > "$out"
sha=$(sha256sum "$out" | cut -d' ' -f1)
sed -i -e "s/^db_commit=.*/db_commit=$commit/" -e "s/^db_date=.*/db_date=$date/" \
  -e "s/^db_sha256=.*/db_sha256=$sha/" scripts/cargo-deny.sh
git add "$out" scripts/cargo-deny.sh
echo "advisory-db $commit ($date) -> $out"
