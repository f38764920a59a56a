#!/usr/bin/env bash
# Builds the CPU image (`cpu-prebuilt` target of deploy/Containerfile)
# around binaries already built on this machine, so one cargo build serves
# the tests and the image.
#
#   deploy/image.sh [--local-base] [--binaries DIR] [--tag TAG]
#
# --binaries  folder holding `coordinator` and `worker` (default target/release)
# --tag       image name (default gancluster:cpu)
# --local-base  build the runtime on a Debian base made here with
#             debootstrap (for machines that cannot pull images): the image
#             is the Containerfile's, apart from where its base came from.
set -euo pipefail
cd "$(dirname "$0")/.."
binaries=target/release tag=gancluster:cpu local_base=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binaries) binaries=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --local-base) local_base=1; shift ;;
    *) echo "deploy/image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v docker >/dev/null || { echo "deploy/image.sh: docker is not installed" >&2; exit 1; }
for bin in coordinator worker; do
  [ -x "$binaries/$bin" ] || { echo "deploy/image.sh: $binaries/$bin is missing: build it first (cargo build)" >&2; exit 1; }
done

args=()
if [ "$local_base" = 1 ]; then
  base=gancluster-local-base:bookworm
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || {
      echo "deploy/image.sh: --local-base needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    # minbase: what debian:*-slim holds (dpkg, apt, coreutils), from Debian's mirror.
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >&2
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*
    tar -C "$root" -c . | docker import - "$base" >/dev/null
    echo "deploy/image.sh: made $base from Debian's packages" >&2
  fi
  args+=(--build-arg "RUNTIME_BASE=$base")
fi

context=$(mktemp -d)
trap 'rm -rf "$context" ${root:+"$root"}' EXIT
mkdir "$context/bin"
cp "$binaries/coordinator" "$binaries/worker" "$context/bin/"
docker build --quiet -f deploy/Containerfile --target cpu-prebuilt "${args[@]}" -t "$tag" "$context" >/dev/null
echo "$tag"
