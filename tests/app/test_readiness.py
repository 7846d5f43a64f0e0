"""Issue 13, defect 7: ready means the configured default model serves and every batch worker is alive
and making progress (a worker stuck in a batch past its deadline, or dead, makes ready fail)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.faults import inject_index_fault
from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])


def healthy_gauge(c: TestClient, model: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(f'satml_batch_worker_healthy{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no satml_batch_worker_healthy series")


def test_missing_default_model_is_not_ready(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, default_model="missing"))) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "not_ready" and r.json()["error"]["code"] == "not_ready"
        assert "'missing'" in r.json()["error"]["message"]
        # the models that did load still answer when named
        r = c.post("/classify", files={"file": ("x.png", GOOD, "image/png")}, data={"model": "other"})
        assert r.status_code == 200


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, threading.Event]]:
    """Models built now get a k-NN index that hangs while `hang` is set, or raises SystemExit
    (kills the worker thread) once `die` is set."""
    events = {"hang": threading.Event(), "die": threading.Event()}
    inject_index_fault(monkeypatch, events["hang"], events["die"])
    yield events
    events["hang"].clear()


def test_stuck_worker_makes_ready_fail_until_it_recovers(good_root: Path, fault) -> None:
    with TestClient(create_app(make_settings(good_root, request_timeout_s=0.3))) as c:
        assert c.get("/health/ready").status_code == 200 and healthy_gauge(c, "default") == 1
        fault["hang"].set()
        r = c.post("/classify", files={"file": ("x.png", GOOD, "image/png")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "inference_timeout"
        time.sleep(0.1)  # the batch is now past its 0.3 s deadline
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["models"]["default"]["worker"] == "stuck"
        assert "default stuck" in r.json()["error"]["message"]
        assert r.json()["models"]["other"]["worker"] == "ok"
        assert healthy_gauge(c, "default") == 0 and healthy_gauge(c, "other") == 1
        fault["hang"].clear()
        deadline = time.monotonic() + 5
        while c.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "worker did not recover"
            time.sleep(0.02)
        assert healthy_gauge(c, "default") == 1
        assert c.post("/classify", files={"file": ("x.png", GOOD, "image/png")}).status_code == 200


def test_dead_worker_makes_ready_fail_and_requests_fail_fast(good_root: Path, fault) -> None:
    with TestClient(create_app(make_settings(good_root)), raise_server_exceptions=False) as c:
        fault["die"].set()
        t0 = time.perf_counter()
        r = c.post("/classify", files={"file": ("x.png", GOOD, "image/png")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        r = c.post("/classify", files={"file": ("x.png", GOOD, "image/png")})  # not queued behind a dead thread
        assert r.status_code == 503 and time.perf_counter() - t0 < 5
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["models"]["default"]["worker"] == "dead"
        assert healthy_gauge(c, "default") == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_dead_worker_ends_one_of_several_processes(good_root: Path, fault, monkeypatch: pytest.MonkeyPatch,
                                                      workers: int) -> None:
    """With several server processes a process whose batch worker died ends (`app.main.end_this_process`, which
    SIGTERMs it; recorded here) for uvicorn's supervisor to replace; one process keeps failing its readiness."""
    import app.main

    ended: list[str] = []
    monkeypatch.setattr(app.main, "end_this_process", ended.append)
    settings = make_settings(good_root, workers=workers, loop_batching="off")  # /classify through the worker
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        fault["die"].set()
        assert c.post("/classify", files={"file": ("x.png", GOOD, "image/png")}).status_code == 503
        deadline = time.monotonic() + 5
        while workers > 1 and not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == (["default"] if workers > 1 else [])
        assert c.get("/health/ready").status_code == 503
