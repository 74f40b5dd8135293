#!/usr/bin/env bash
# Builds the CPU image (deploy/images/Containerfile.cpu) with buildah, without pulling any
# image, then runs every binary's --help from the built image's own root filesystem as UID
# 10001.
#
#   scripts/build-image.sh [--profile release|dev] [--tag TAG] [--save FILE.tar]
#
# The Containerfile's final stage is built as in production, with two build args:
#   BINARIES=prebuilt      the binaries come from this checkout's cargo build (same command
#                          as the Containerfile's build stage) instead of a Rust image;
#   RUNTIME_IMAGE=...      a root filesystem made here standing in for the production base
#                          (gcr.io/distroless/cc-debian12): the shared libraries the binaries
#                          load (found with ldd: glibc, libgcc_s, libstdc++), CA certificates,
#                          /etc/passwd with the service user, /tmp. The binaries are built on
#                          this Debian 12 machine, the same glibc as distroless cc-debian12.
# --profile dev reuses the test build (scripts/test.sh) and takes seconds; release (the
# default) is what you would ship. --save writes an image archive (podman load / kind load
# image-archive).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medgemma-serve/target}"

profile=release
tag=""
save=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --save) save="$2"; shift 2 ;;
    *) echo "usage: $0 [--profile release|dev] [--tag TAG] [--save FILE.tar]" >&2; exit 2 ;;
  esac
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="${tag:-$version-$profile}"
image="localhost/medgemma-serve:$tag"
base="localhost/medgemma-runtime-base:debian12"
bins=(medgemma medgemma-gateway medgemma-generator medgemma-tokenizer medgemma-vision)

if ! command -v buildah >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing buildah (Debian package)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null
  else
    echo "error: buildah is not installed (Debian/Ubuntu: apt-get install buildah)" >&2
    exit 1
  fi
fi
# Root in a VM or container without overlay support: the vfs driver and chroot isolation work
# everywhere. Nothing here runs a container; `buildah bud` only copies files.
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

echo "== cargo build --profile $profile (the Containerfile's build stage, here)" >&2
cargo build --locked --profile "$profile" \
  -p medgemma-cli -p medgemma-gateway -p medgemma-generator \
  -p medgemma-tokenizer-service -p medgemma-vision-service
out_dir="$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")"

work=$(mktemp -d)
ctrs=()
cleanup() {
  for c in "${ctrs[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The build context of the prebuilt path: bin/ and an empty cache/.
mkdir -p "$work/ctx/bin" "$work/ctx/cache"
for b in "${bins[@]}"; do cp "$out_dir/$b" "$work/ctx/bin/"; done

echo "== runtime root filesystem (stands in for gcr.io/distroless/cc-debian12)" >&2
root="$work/rootfs"
mkdir -p "$root"/{etc/ssl/certs,tmp,usr/local/bin,var/cache}
chmod 1777 "$root/tmp"
libs=$(for b in "${bins[@]}"; do ldd "$out_dir/$b"; done | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | sort -u)
for lib in $libs; do
  # Keep the path the loader looks in; copy the file behind any symlink.
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
medgemma:x:10001:10001:medgemma:/tmp:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
medgemma:x:10001:
GROUP
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
echo "$libs" | sed 's/^/  /' >&2

buildah rmi -f "$base" >/dev/null 2>&1 || true
ctr=$(buildah from scratch)
ctrs+=("$ctr")
mnt=$(buildah mount "$ctr")
cp -a "$root/." "$mnt/"
buildah umount "$ctr" >/dev/null
buildah config --created-by "scripts/build-image.sh (ldd layout)" "$ctr"
buildah commit -q "$ctr" "$base" >/dev/null

echo "== buildah bud deploy/images/Containerfile.cpu -> $image" >&2
dangling_before=$(buildah images -q --filter dangling=true | sort -u)
buildah bud -q --layers=false \
  --build-arg BINARIES=prebuilt \
  --build-arg RUNTIME_IMAGE="$base" \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -f deploy/images/Containerfile.cpu -t "$image" "$work/ctx" >/dev/null
# The intermediate stage images this build left (untagged), not anyone else's.
# (buildah 1.28 keeps a working container of the `FROM ${BINARIES}` stage: remove it first.)
for id in $(comm -13 <(echo "$dangling_before") <(buildah images -q --filter dangling=true | sort -u)); do
  buildah containers --format '{{.ContainerID}} {{.ImageID}}' | while read -r c img; do
    case "$img" in "$id"*) buildah rm "$c" >/dev/null 2>&1 || true ;; esac
  done
  buildah rmi "$id" >/dev/null 2>&1 || true
done

echo "== checks on $image" >&2
config=$(buildah inspect --type image "$image")
python3 - "$config" <<'PY'
import json, sys
c = json.loads(sys.argv[1])
oci = c["OCIv1"]["config"]
labels = oci.get("Labels") or {}
problems = []
if oci.get("User") != "10001:10001":
    problems.append(f"user is {oci.get('User')!r}, not 10001:10001")
for k in ("org.opencontainers.image.title", "org.opencontainers.image.version",
          "org.opencontainers.image.revision", "org.opencontainers.image.licenses",
          "org.opencontainers.image.created"):
    if not labels.get(k):
        problems.append(f"label {k} missing")
if c.get("Docker", {}).get("config", {}).get("Healthcheck"):
    problems.append("the image has a HEALTHCHECK")
if problems:
    sys.exit("image config: " + "; ".join(problems))
print(f"  user {oci['User']}, {len(labels)} OCI labels, no HEALTHCHECK")
PY

# Each binary runs from the image's own root filesystem: in a container (`buildah run` with
# chroot isolation: the image's user, environment and filesystem) where the machine allows
# it, else by chroot into the mounted image as UID 10001.
ctr=$(buildah from -q "$image")
ctrs+=("$ctr")
mnt=$(buildah mount "$ctr")
if find "$mnt" -name '*.safetensors' -o -name '*.gguf' | grep -q .; then
  echo "error: model weights inside the image" >&2
  exit 1
fi
how="buildah run --isolation chroot"
if ! buildah run --isolation chroot "$ctr" -- medgemma --version >/dev/null 2>&1; then
  how="chroot --userspec=10001:10001"
fi
for b in "${bins[@]}"; do
  if [ "$how" = "chroot --userspec=10001:10001" ]; then
    out=$(chroot --userspec=10001:10001 "$mnt" "/usr/local/bin/$b" --help 2>&1) || rc=$?
  else
    out=$(buildah run --isolation chroot "$ctr" -- "$b" --help 2>&1) || rc=$?
  fi
  if [ "${rc:-0}" != 0 ] || ! grep -qi '^usage:' <<<"$out"; then
    echo "error: $b --help failed inside the image ($how):" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "  $b --help ($how): $(grep -m1 -i '^usage:' <<<"$out")" >&2
done
buildah umount "$ctr" >/dev/null
size=$(buildah images --format '{{.Size}}' "$image" | head -1)
if [ -n "$save" ]; then
  rm -f "$save"
  buildah push -q "$image" "docker-archive:$save:$image" >/dev/null
  echo "saved $save" >&2
fi
echo "built $image ($size)"
