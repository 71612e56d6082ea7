#!/usr/bin/env bash
# Make the base image compose/Dockerfile builds on, locally, without an image registry:
# a minimal Debian bookworm (python3 3.11, python3-venv, ca-certificates) by debootstrap,
# imported into the running Docker daemon. Does nothing when the image already exists.
#
# Usage: bash compose/base-image.sh [IMAGE]      (default epserve-base:bookworm; run as root)
# Needs: debootstrap, a running Docker daemon, Debian's mirror (DEBIAN_MIRROR to change it).
# Takes ~1.5 minutes on 2 cores (~45 MB of packages).
set -euo pipefail
image=${1:-epserve-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

if "$docker" image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists" >&2
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/epserve-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm into $rootfs (from $mirror)" >&2
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -n 30 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    echo "base-image.sh: debootstrap failed" >&2
    exit 1
fi
rm -f "$rootfs.log"
# Apt lists and package caches are not needed in the image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base image $image made" >&2
