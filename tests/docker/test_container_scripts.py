"""The two scripts the image runs, exercised on the host: docker/entrypoint.sh (which artifacts
folder the server reads) and docker/healthcheck.py (exit code from GET /health/ready)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.docker.dockertools import REPO

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def _entry_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    env.update(
        SATML_BAKED_ARTIFACTS_DIR=str(tmp_path / "baked"),
        SATML_EXTRA_ARTIFACTS_DIR=str(tmp_path / "extra"),
        TMPDIR=str(tmp_path),
    )
    env.update(extra)
    return env


def _artifacts_dir(env: dict[str, str]) -> str:
    cmd = ["sh", str(ENTRYPOINT), "sh", "-c", 'printf %s "$SATML_ARTIFACTS_DIR"']
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=10).stdout


@pytest.fixture
def baked(tmp_path: Path) -> Path:
    for name in ("default", "supervised"):
        (tmp_path / "baked" / name).mkdir(parents=True)
        (tmp_path / "baked" / name / "manifest.json").write_text(f'{{"name": "{name}"}}')
    (tmp_path / "extra").mkdir()
    return tmp_path / "baked"


def test_entrypoint_uses_baked_artifacts_when_no_extra(tmp_path: Path, baked: Path) -> None:
    assert _artifacts_dir(_entry_env(tmp_path)) == str(baked)


def test_entrypoint_merges_extra_over_baked(tmp_path: Path, baked: Path) -> None:
    for name in ("default", "mine"):  # replaces the baked default, adds a model
        (tmp_path / "extra" / name).mkdir()
        (tmp_path / "extra" / name / "manifest.json").write_text(f'{{"name": "extra-{name}"}}')
    merged = Path(_artifacts_dir(_entry_env(tmp_path)))
    assert merged.parent == tmp_path and merged != baked
    assert sorted(p.name for p in merged.iterdir()) == ["default", "mine", "supervised"]
    assert (merged / "default" / "manifest.json").read_text() == '{"name": "extra-default"}'
    assert (merged / "supervised" / "manifest.json").read_text() == '{"name": "supervised"}'


def test_entrypoint_respects_explicit_artifacts_dir(tmp_path: Path, baked: Path) -> None:
    (tmp_path / "extra" / "mine").mkdir()
    assert _artifacts_dir(_entry_env(tmp_path, SATML_ARTIFACTS_DIR="/somewhere")) == "/somewhere"


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health/ready" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("status", "rc"), [(200, 0), (503, 1)])
def test_healthcheck_exit_code(status: int, rc: int) -> None:
    handler = type("H", (_Ready,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "SATML_PORT": str(server.server_address[1])}
        out = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=20)
        assert out.returncode == rc, out.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SATML_PORT": str(port)}
    out = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "not ready" in out.stderr
