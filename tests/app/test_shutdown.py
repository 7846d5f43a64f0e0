"""Issue 13, defect 8: on SIGTERM (uvicorn's should_exit) under load, every in-flight request gets a
response or a connection error it can retry, and the server exits within its grace period, even with
a batch stuck in `predict`."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import app.logs
import app.predictor
import app.serve
from app.config import Settings
from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.faults import inject_index_fault
from tests.app.servers import wait_ready
from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])
GRACE_S = 1


def test_exit_within_grace_with_a_stuck_batch(good_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    hang = threading.Event()
    inject_index_fault(monkeypatch, hang, stuck_s=15)  # stuck far past the grace period
    settings = make_settings(good_root, log_level="warning", shutdown_grace_s=GRACE_S)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # the same graceful-shutdown bound that satml-serve gives uvicorn
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=app.serve.graceful_timeout(settings)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_ready(thread.is_alive, f"{url}/health/ready", timeout_s=60, poll_s=0.05)

    outcomes: list[str] = []

    def client(i: int) -> None:
        try:
            r = httpx.post(f"{url}/classify", files={"file": (f"{i}.png", GOOD, "image/png")}, timeout=30)
            outcomes.append(str(r.status_code))
        except httpx.TransportError as e:  # closed by the server: the client may retry elsewhere
            outcomes.append(type(e).__name__)

    hang.set()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in clients:
        t.start()
    time.sleep(0.5)  # all four in flight, one batch stuck in predict
    t0 = time.monotonic()
    server.should_exit = True  # what uvicorn's SIGTERM handler does
    thread.join(10)
    exited_after = time.monotonic() - t0
    for t in clients:
        t.join(5)
    hang.clear()
    sock.close()
    assert not thread.is_alive() and exited_after < GRACE_S + 3, f"exit took {exited_after:.1f} s"
    assert len(outcomes) == 4 and all(o in ("503", "200") or o.endswith("Error") for o in outcomes), outcomes


def test_satml_serve_bounds_graceful_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: seen.update(kw))
    monkeypatch.setattr(app.logs, "configure_logging", lambda level: None)  # keep pytest's log handlers
    monkeypatch.setenv("SATML_SHUTDOWN_GRACE_S", "7.5")
    monkeypatch.setenv("SATML_ARTIFACTS_DIR", "/nonexistent")
    monkeypatch.setenv("SATML_WORKERS", "1")  # one process: uvicorn.run (auto would start a supervisor on 2 cores)
    app.serve.main([])
    assert seen["timeout_graceful_shutdown"] == 8 == app.serve.graceful_timeout(Settings(shutdown_grace_s=7.5))
    assert Settings().shutdown_grace_s < 20  # compose's stop_grace_period kills at 20 s
