#!/usr/bin/env bash
# Build a local base image from Debian packages, for machines that cannot reach a public image
# registry: debootstrap a minimal Debian (with Python 3.11 and venv) into a folder, then
# `docker import` it. The project image is then built FROM it through the BASE_IMAGE build arg:
#   docker/local/build-base.sh            -> image satml-base:bookworm
#   docker/local/build-image.sh cpu       -> builds satml:cpu on top of it
# Needs root, debootstrap and a running daemon (docker/local/dockerd.sh start).
set -euo pipefail

TAG=${SATML_BASE_TAG:-satml-base:bookworm}
SUITE=${SATML_BASE_SUITE:-bookworm}
MIRROR=${SATML_BASE_MIRROR:-http://deb.debian.org/debian}
WORKDIR=${SATML_BASE_WORKDIR:-/var/tmp/satml-base}
# python3 + venv (ensurepip) is all the Dockerfile needs; ca-certificates for pip over https;
# libgomp1 for faiss/onnxruntime OpenMP.
INCLUDE=python3,python3-venv,ca-certificates,libgomp1
# CA bundle the build's pip must trust. Where HTTPS goes through a TLS-inspecting proxy (as on this
# project's machines), the host's bundle holds the proxy's CA, which Debian's does not: it is copied
# into the base image and pip is pointed at it (PIP_CERT). Default: the host pip's own setting.
CA_BUNDLE=${SATML_BASE_CA_BUNDLE-${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}}

if docker image inspect "$TAG" >/dev/null 2>&1 && [[ "${1:-}" != "--force" ]]; then
    echo "base image $TAG exists (pass --force to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap not installed (apt-get install -y debootstrap)" >&2; exit 1; }

rootfs="$WORKDIR/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"
echo "debootstrap $SUITE from $MIRROR into $rootfs"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$MIRROR"

# Trim what a container never uses: apt lists and caches, docs, man pages, locales.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" > "$rootfs/etc/apt/sources.list"
changes=()
if [[ -n $CA_BUNDLE && -f $CA_BUNDLE ]]; then
    echo "using the host's CA bundle $CA_BUNDLE for pip in the image"
    cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    changes+=(--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt')
fi

tar --numeric-owner -C "$rootfs" -c . | docker import "${changes[@]}" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $SUITE minbase + $INCLUDE" \
    - "$TAG"
rm -rf "$rootfs"
docker image ls "$TAG"
