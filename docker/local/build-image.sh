#!/usr/bin/env bash
# Build the project image on a machine without access to public image registries or the PyTorch
# wheel index (like this project's dev/CI machines):
#   - FROM the local base image made by docker/local/build-base.sh (BASE_IMAGE build arg);
#   - the build runs on the host network (`--network host`: the daemon has no bridge);
#   - torch comes from a local wheelhouse served over HTTP on 127.0.0.1 for the length of the
#     build (pip prefers its 2.13.0+cpu wheel to PyPI's CUDA build of the same release); all other
#     packages come from PyPI as usual.
#
#   docker/local/build-image.sh [cpu|gpu] [extra docker build args...]
#
# Env: SATML_IMAGE (satml), SATML_BASE_IMAGE (satml-base:bookworm), SATML_WHEELHOUSE (a folder
# of wheels; default /opt/wheels when it holds a torch wheel, else none: torch then comes from
# the Dockerfile's default index), SATML_WHEELHOUSE_PORT (38471, on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/../.."

VARIANT=${1:-cpu}
shift || true
IMAGE=${SATML_IMAGE:-satml}:$VARIANT
BASE=${SATML_BASE_IMAGE:-satml-base:bookworm}
WHEELHOUSE=${SATML_WHEELHOUSE:-}
if [[ -z $WHEELHOUSE ]] && compgen -G "/opt/wheels/torch-*.whl" >/dev/null; then WHEELHOUSE=/opt/wheels; fi

args=(--network host -f docker/Dockerfile -t "$IMAGE"
      --build-arg "VARIANT=$VARIANT" --build-arg "BASE_IMAGE=$BASE")

server_pid=
cleanup() { [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [[ -n $WHEELHOUSE && $VARIANT == cpu ]]; then
    # A fixed port: the URL is part of a build arg, and a changed build arg misses the cache of the
    # dependency layer. Only when that port is taken does a free one serve (and the layer rebuilds).
    port=${SATML_WHEELHOUSE_PORT:-38471}
    if ! python3 -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', $port))" 2>/dev/null; then
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        echo "port ${SATML_WHEELHOUSE_PORT:-38471} busy: wheelhouse on $port (the dependency layer will rebuild)" >&2
    fi
    python3 -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$port" >/dev/null 2>&1 &
    server_pid=$!
    for _ in $(seq 1 50); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
        sleep 0.1
    done
    echo "wheelhouse $WHEELHOUSE served on http://127.0.0.1:$port/ for this build" >&2
    args+=(--build-arg TORCH_INDEX_URL=pypi --build-arg "PIP_EXTRA_ARGS=--find-links http://127.0.0.1:$port/")
fi

echo "docker build ${args[*]} $* ." >&2
start=$(date +%s)
docker build "${args[@]}" "$@" .
echo "built $IMAGE in $(( $(date +%s) - start )) s: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')" >&2
