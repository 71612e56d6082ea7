#!/usr/bin/env bash
# Make the base image compose/Dockerfile builds on, locally, without an image registry:
# a minimal Debian bookworm (python3 3.11, python3-venv, ca-certificates) by debootstrap,
# imported into the running Docker daemon. Does nothing when the image already exists.
#
# Usage (as root):
#   bash compose/base-image.sh [IMAGE [ROOTFS]]   IMAGE default epserve-base:bookworm; ROOTFS:
#                                                 a tree made by --rootfs to import instead
#   bash compose/base-image.sh --rootfs DIR       only the debootstrap part, into DIR (needs no
#                                                 Docker daemon; smoke.sh runs it while it
#                                                 installs Docker)
# Needs: debootstrap, Debian's mirror (DEBIAN_MIRROR to change it); a Docker daemon to import.
# Takes ~1.5 minutes on 2 cores (~45 MB of packages).
set -euo pipefail
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
DONE=.epserve-rootfs-complete

make_rootfs() {  # DIR
    local dir=$1
    command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; return 1; }
    mkdir -p "$dir"
    echo "debootstrap bookworm into $dir (from $mirror)" >&2
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$dir" "$mirror" >"$dir.log" 2>&1; then
        tail -n 30 "$dir.log" >&2
        rm -f "$dir.log"
        echo "base-image.sh: debootstrap failed" >&2
        return 1
    fi
    rm -f "$dir.log"
    # Apt lists and package caches are not needed in the image.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    touch "$dir/$DONE"
}

if [ "${1:-}" = --rootfs ]; then
    [ -n "${2:-}" ] || { echo "usage: base-image.sh --rootfs DIR" >&2; exit 2; }
    make_rootfs "$2"
    exit
fi

image=${1:-epserve-base:bookworm}
rootfs=${2:-}
if "$docker" image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists" >&2
    exit 0
fi
if [ -z "$rootfs" ] || [ ! -f "$rootfs/$DONE" ]; then
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/epserve-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    make_rootfs "$rootfs"
fi
tar -C "$rootfs" --exclude="./$DONE" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "base image $image made" >&2
