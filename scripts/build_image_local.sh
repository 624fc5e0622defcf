#!/usr/bin/env bash
# Exercise the Dockerfile's `build` stage where no registry or Docker engine is reachable.
#
#   sudo bash scripts/build_image_local.sh            # the build stage
#   sudo bash scripts/build_image_local.sh --runtime  # the whole image (the runtime stage)
#
# Needs root, buildah and debootstrap.
# 1. Makes a local base image, localhost/backbones-pybase:test: a minimal Debian bookworm with
#    python3 and a venv at /opt/venv first on PATH, as the CUDA PyTorch base has its Python
#    (debootstrap from the mirror apt already uses), imported with buildah. It is built once
#    and reused; REBUILD_BASE=1 makes it again.
# 2. Builds the Dockerfile's `build` stage FROM that base (--build-arg BASE_IMAGE=...), tagged
#    localhost/backbones-build:test, checks the wheel is in /dist of the built image and copies
#    it to $STATE/dist/.
# 3. With --runtime, builds the final stage too, tagged localhost/backbones:test. The base has
#    no torch, so pip installs the pinned torch and torchvision (the CUDA wheels, ~5.5 GB with
#    their nvidia-* dependencies) from the indexes this host's pip uses; file:// indexes are
#    mounted read-only into the build. Prints the image's size.
#
# Storage is vfs with chroot isolation, so it runs in an unprivileged container without overlayfs
# or user namespaces. Everything lands in $STATE (default build/buildah/, ignored by git); the
# runtime image needs up to ~40 GB there while it builds (vfs copies the whole ~6.5 GB tree for
# every later step, ENV and USER included) and ~8 GB once built.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${BACKBONES_BUILDAH_DIR:-$ROOT/build/buildah}
BASE=localhost/backbones-pybase:test
IMAGE=localhost/backbones-build:test
RUNTIME=localhost/backbones:test
SUITE=bookworm
RUNTIME_STAGE=0
[ "${1:-}" = --runtime ] && RUNTIME_STAGE=1

die() { echo "build_image_local: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap and buildah's chroot isolation)"
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install -y buildah debootstrap)"
done

mkdir -p "$STATE"
bh() { buildah --storage-driver vfs --root "$STATE/storage" --runroot "$STATE/run" "$@"; }

# The Debian mirror apt is configured with (deb822 or one-line sources), else the public one.
mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local found
  found=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | sed -n 's/^URIs:[[:space:]]*\(\S*\/debian\)\/\?$/\1/p' | head -n1)
  [ -n "$found" ] || found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\(\S*\/debian\)\/\?[[:space:]].*/\2/p' \
    | head -n1)
  echo "${found:-http://deb.debian.org/debian}"
}

make_base() {
  local rootfs="$STATE/rootfs"
  # debootstrap leaves a partial tree when interrupted: only a finished one carries the marker.
  if [ ! -e "$rootfs/.backbones-complete" ]; then
    rm -rf "$rootfs"
    local url
    url=$(mirror)
    echo "== debootstrap $SUITE from $url"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
      "$SUITE" "$rootfs" "$url" >"$STATE/debootstrap.log" 2>&1 \
      || die "debootstrap failed, see $STATE/debootstrap.log"
    # CAs this host trusts (e.g. a TLS-intercepting proxy's) so pip inside the build can reach
    # PyPI for the build backend, as it does from the real base on an open network.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # Python in a venv, like the CUDA base's /opt/conda: pip may install there (Debian's own
    # python3 refuses, PEP 668), and the console scripts land on PATH.
    chroot "$rootfs" python3 -m venv /opt/venv
    touch "$rootfs/.backbones-complete"
  fi
  echo "== import $BASE"
  local ctr
  ctr=$(bh from scratch)
  bh copy "$ctr" "$rootfs/" / >/dev/null
  bh run --isolation chroot "$ctr" -- rm -f /.backbones-complete
  bh config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$ctr"
  bh commit -q --rm "$ctr" "$BASE" >/dev/null
}

start=$SECONDS
if [ "${REBUILD_BASE:-0}" = 1 ] || ! bh images -q "$BASE" >/dev/null 2>&1; then
  make_base
  echo "== base ready in $((SECONDS - start)) s"
else
  echo "== base $BASE cached"
fi

t=$SECONDS
echo "== buildah bud --target build"
bh bud --isolation chroot --target build --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" "$ROOT" \
  >"$STATE/bud.log" 2>&1 || { tail -n 40 "$STATE/bud.log" >&2; die "build failed, see $STATE/bud.log"; }
echo "== build stage built in $((SECONDS - t)) s"

# The stage's product: exactly one wheel in /dist of the built image. Copy it out for checks.
ctr=$(bh from -q "$IMAGE")
trap 'bh rm "$ctr" >/dev/null 2>&1 || true' EXIT
wheel=$(bh run --isolation chroot "$ctr" -- sh -c 'ls /dist/backbones-*-py3-none-any.whl')
[ "$(echo "$wheel" | wc -l)" = 1 ] || die "expected one wheel in /dist, found: $wheel"
rm -rf "$STATE/dist" && mkdir -p "$STATE/dist"
bh run --isolation chroot "$ctr" -- cat "$wheel" >"$STATE/dist/$(basename "$wheel")"
echo "== $IMAGE:$wheel -> $STATE/dist/$(basename "$wheel") (total $((SECONDS - start)) s)"

[ "$RUNTIME_STAGE" = 1 ] || exit 0

# The indexes this host's pip uses (PyPI and its mirrors); file:// ones are mounted into the
# build read-only at the same path, so the pinned torch comes from the same wheels as here.
extra=${PIP_EXTRA_INDEX_URL:-$(pip config get global.extra-index-url 2>/dev/null || true)}
volumes=()
for url in $extra; do
  case "$url" in
    file://*) dir=$(dirname "${url#file://}"); volumes+=(--volume "$dir:$dir:ro") ;;
  esac
done
t=$SECONDS
echo "== buildah bud (runtime stage)"
bh bud --isolation chroot --layers --build-arg "BASE_IMAGE=$BASE" \
  --build-arg "PIP_EXTRA_INDEX_URL=$extra" "${volumes[@]}" -t "$RUNTIME" "$ROOT" \
  >"$STATE/bud-runtime.log" 2>&1 \
  || { tail -n 40 "$STATE/bud-runtime.log" >&2; die "runtime build failed, see $STATE/bud-runtime.log"; }
echo "== runtime stage built in $((SECONDS - t)) s"
size=$(bh inspect --type image --format '{{.Size}}' "$RUNTIME" 2>/dev/null || true)
echo "== $RUNTIME size: $(bh images --format '{{.Size}}' "$RUNTIME") ${size:+($size bytes)}"
