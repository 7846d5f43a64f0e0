"""Issue 13's fault injection, slow model setup: while a model's runtime and index are being built no client is
left hanging (uvicorn binds only after the lifespan has loaded the models, so a connection is refused at once and
can be retried), and a setup that outlives its deadline skips that model with a log line while the others serve."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import app.predictor
import app.registry
from app.main import create_app
from app.metrics import Metrics
from app.registry import load_registry
from tests.app.conftest import make_settings
from tests.app.servers import wait_ready
from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])


def _slow_setup(monkeypatch: pytest.MonkeyPatch, seconds: float, only: str | None = None) -> threading.Event:
    """Make `Predictor.setup` (the worker thread's build of runtime + index) sleep `seconds` first, for the
    artifact folder named `only` (every one when None); the returned event is set when a slow setup starts."""
    entered = threading.Event()
    real = app.predictor.Predictor.setup

    def setup(self: app.predictor.Predictor) -> app.predictor.PredictFn:
        if only is None or self.folder.name == only:
            entered.set()
            time.sleep(seconds)
        return real(self)

    monkeypatch.setattr(app.predictor.Predictor, "setup", setup)
    return entered


def test_connections_are_refused_not_held_while_models_load(good_root: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    import uvicorn

    entered = _slow_setup(monkeypatch, 3.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(make_settings(good_root)), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert entered.wait(60), "model setup never started"
        for path in ("/health/live", "/health/ready", "/classify"):
            t0 = time.monotonic()
            with pytest.raises(httpx.ConnectError):  # refused at once: the client retries, nothing waits 30 s
                if path == "/classify":
                    httpx.post(f"{url}{path}", files={"file": ("a.png", GOOD, "image/png")}, timeout=10)
                else:
                    httpx.get(f"{url}{path}", timeout=10)
            assert time.monotonic() - t0 < 1.0
        wait_ready(thread.is_alive, f"{url}/health/ready", timeout_s=60, poll_s=0.05)
        r = httpx.post(f"{url}/classify", files={"file": ("a.png", GOOD, "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive()


def test_a_setup_past_its_deadline_skips_only_that_model(good_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.registry")
    monkeypatch.setattr(app.registry, "SETUP_TIMEOUT_S", 0.5)
    _slow_setup(monkeypatch, 3.0, only="other")
    t0 = time.monotonic()
    reg = load_registry(make_settings(good_root), Metrics())
    try:
        assert time.monotonic() - t0 < 3.0  # start-up waited the deadline, not the whole slow setup
        assert sorted(reg.models) == ["default"] and reg.default == "default"  # served under the folder name
        assert "setup did not finish" in reg.skipped["other"]
        skipped = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "artifact_skipped"]
        assert [r.fields["model"] for r in skipped] == ["other"]
        images, labels = toy_images(1, 5)
        pred, _ = reg.get("default").worker.submit(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
                                                   ).result(30)
        assert pred.tolist() == labels.tolist()
    finally:
        reg.close()
