"""Issue 13, defect 4: overload sheds load with 429/503 + Retry-After instead of hanging.

Faults are injected: a `predict` that hangs (the model's k-NN index blocks on an event) and a decoder
that blocks. Each scenario bounds its own run time; every request must be answered quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import app.images
import app.predictor
from app.batching import BatchWorker, QueueFull
from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.faults import inject_index_fault
from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])
# above app.deps.INLINE_MAX_PIXELS: decoded on a decode thread (a slot), not inline on the event loop
BIG = png(np.ascontiguousarray(np.broadcast_to(toy_images(1, 3)[0][0][:1, :1], (200, 200, 3))))


def blocking_worker(max_queue: int) -> tuple[BatchWorker, threading.Event, threading.Event]:
    entered, release = threading.Event(), threading.Event()

    def setup():
        def predict(x: torch.Tensor):
            entered.set()
            release.wait(10)
            return torch.zeros(x.shape[0], dtype=torch.long), torch.ones(x.shape[0], 2, dtype=torch.long)
        return predict

    w = BatchWorker("t", setup, max_batch=1, max_wait_s=0, max_queue=max_queue)
    w.start(5)
    return w, entered, release


def test_batch_queue_is_bounded() -> None:
    w, entered, release = blocking_worker(max_queue=3)
    try:
        running = w.submit(torch.zeros(1, 3, 2, 2))
        assert entered.wait(5)  # the worker is stuck in predict
        queued = [w.submit(torch.zeros(1, 3, 2, 2)) for _ in range(3)]
        with pytest.raises(QueueFull) as e:
            w.submit(torch.zeros(1, 3, 2, 2))
        assert e.value.retry_after_s >= 1 and "3" in str(e.value)
        assert queued[2].cancel()  # a caller that gives up frees its place at once
        extra = w.submit(torch.zeros(1, 3, 2, 2))
        release.set()
        for f in (running, *queued[:2], extra):
            assert f.result(5)[0].tolist() == [0]
        assert w.submit(torch.zeros(1, 3, 2, 2)).result(5)[0].tolist() == [0]  # room again
        big = w.submit(torch.zeros(5, 3, 2, 2))  # larger than the queue, but alone: accepted, never starved
        assert big.result(5)[0].tolist() == [0] * 5
    finally:
        release.set()
        w.close()


@pytest.fixture
def hanging_index(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Models built now get a k-NN index that blocks while the returned event is set (fault injection)."""
    hang = threading.Event()
    inject_index_fault(monkeypatch, hang)
    yield hang
    hang.clear()


def run_burst(application, n: int, timeout: float = 10.0) -> tuple[list[httpx.Response], list[float], httpx.Response]:
    """n concurrent /classify requests while `hang` is set (by the caller), then one after the burst."""

    async def one(c: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        t0 = time.perf_counter()
        r = await c.post("/classify", files={"file": ("x.png", GOOD, "image/png")})
        return r, time.perf_counter() - t0

    async def scenario():
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=timeout) as c:
                application.state.hang.set()
                out = await asyncio.gather(*[one(c) for _ in range(n)])
                application.state.hang.clear()
                after = await c.post("/classify", files={"file": ("x.png", GOOD, "image/png")})
                return [r for r, _ in out], [s for _, s in out], after

    return asyncio.run(scenario())


def assert_shed(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and set(r.json()) == {"error"}
    assert int(r.headers["Retry-After"]) >= 1


def test_full_batch_queue_answers_429_at_once(good_root: Path, hanging_index: threading.Event) -> None:
    application = create_app(make_settings(good_root, max_batch=1, max_wait_ms=0, max_queue_images=2,
                                           request_timeout_s=1.5))
    application.state.hang = hanging_index
    responses, seconds, after = run_burst(application, 8)
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(429) >= 5, statuses  # 1 running + 2 queued; the rest are refused
    for r, s in zip(responses, seconds, strict=True):
        if r.status_code == 429:
            assert_shed(r, 429, "queue_full")
            assert s < 1.0  # refused at once, not after the 1.5 s deadline
        else:  # the running and queued ones hit the deadline while predict hangs
            assert_shed(r, 503, "inference_timeout")
            assert s < 4.0
    assert after.status_code == 200, after.text  # and the server serves again


def test_too_many_requests_in_progress_answer_503(good_root: Path, hanging_index: threading.Event) -> None:
    application = create_app(make_settings(good_root, max_concurrent_requests=3, request_timeout_s=1.5))
    application.state.hang = hanging_index
    responses, seconds, after = run_burst(application, 8)
    over = [(r, s) for r, s in zip(responses, seconds, strict=True) if r.status_code == 503
            and r.json()["error"]["code"] == "overloaded"]
    assert len(over) == 5, [r.status_code for r in responses]
    for r, s in over:
        assert_shed(r, 503, "overloaded")
        assert s < 1.0
    assert after.status_code == 200, after.text


def test_decode_slot_wait_has_a_deadline(good_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoders all busy (one slot, blocked): the next request gets 503 + Retry-After after decode_wait_s.
    Images above the inline size, as only those take a decode slot."""
    gate, real = threading.Event(), app.images.load_image

    def slow_load(*args, **kwargs):
        gate.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(app.images, "load_image", slow_load)
    application = create_app(make_settings(good_root, decode_slots=1, decode_wait_s=0.3))

    async def scenario():
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=10) as c:
                first = asyncio.ensure_future(c.post("/classify", files={"file": ("a.png", BIG, "image/png")}))
                await asyncio.sleep(0.3)  # the first one holds the only slot
                t0 = time.perf_counter()
                second = await c.post("/classify", files={"file": ("b.png", BIG, "image/png")})
                waited = time.perf_counter() - t0
                gate.set()
                return await first, second, waited

    first, second, waited = asyncio.run(scenario())
    assert first.status_code == 200, first.text
    assert_shed(second, 503, "overloaded")
    assert 0.25 < waited < 2.0


def test_inflight_counts_the_posts_in_progress_for_the_batch_workers() -> None:
    """AdmissionMiddleware's count is the one the batch workers read (`InFlight.others`): POSTs only, while they
    run, and back to zero after, an error included."""
    from app.middleware import AdmissionMiddleware, InFlight

    inflight, seen = InFlight(), []

    async def inner(scope: dict, receive: object, send: object) -> None:
        seen.append((scope["method"], inflight.active, inflight.others()))
        if scope["path"] == "/boom":
            raise RuntimeError("boom")

    mw = AdmissionMiddleware(inner, max_requests=4, inflight=inflight)

    async def main() -> None:
        for method, path in (("POST", "/classify"), ("GET", "/health"), ("POST", "/boom")):
            with contextlib.suppress(RuntimeError):
                await mw({"type": "http", "method": method, "path": path}, None, None)  # type: ignore[arg-type]
        inflight.active = 1  # another request in progress: the next POST is not alone
        await mw({"type": "http", "method": "POST", "path": "/classify"}, None, None)  # type: ignore[arg-type]

    asyncio.run(main())
    assert seen == [("POST", 1, False), ("GET", 0, False), ("POST", 1, False), ("POST", 2, True)]
    assert inflight.active == 1
