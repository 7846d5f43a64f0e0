"""AttackService: bounded admission (429 + Retry-After), deadline (504), slots freed when jobs end."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.attack import AttackService, DeadlinePassed
from app.errors import ApiError
from app.metrics import Metrics


def test_admission_limit_and_release() -> None:
    svc = AttackService(concurrency=1, queue_size=1, timeout_s=10, metrics=Metrics())
    gate = threading.Event()

    async def scenario() -> None:
        running = [asyncio.ensure_future(svc.run(lambda _d, i=i: gate.wait(5) and i)) for i in range(2)]
        await asyncio.sleep(0.05)
        assert svc.active == 2
        with pytest.raises(ApiError) as e:
            await svc.run(lambda _d: 0)
        assert e.value.status == 429 and e.value.headers and int(e.value.headers["Retry-After"]) >= 1
        gate.set()
        assert await asyncio.gather(*running) == [0, 1]
        assert svc.active == 0
        assert await svc.run(lambda _d: "again") == "again"

    asyncio.run(scenario())
    svc.close()


def test_timeout_frees_the_slot_when_the_job_ends() -> None:
    svc = AttackService(concurrency=1, queue_size=0, timeout_s=0.1, metrics=Metrics())

    def slow(deadline: float) -> str:
        time.sleep(0.3)
        if time.monotonic() > deadline:  # what AttackJob does between phases
            raise DeadlinePassed
        return "late"

    async def scenario() -> None:
        with pytest.raises(ApiError) as e:
            await svc.run(slow)
        assert e.value.status == 504
        assert svc.active == 1  # still running on its thread: the slot is honest about it
        await asyncio.sleep(0.4)
        assert svc.active == 0

    asyncio.run(scenario())
    svc.close()


def test_job_queued_past_its_deadline_does_not_run() -> None:
    svc = AttackService(concurrency=1, queue_size=1, timeout_s=0.1, metrics=Metrics())
    ran: list[int] = []

    async def scenario() -> None:
        first = asyncio.ensure_future(svc.run(lambda _d: time.sleep(0.3)))
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError):
            await svc.run(lambda _d: ran.append(1))
        with pytest.raises(ApiError):
            await first
        await asyncio.sleep(0.4)

    asyncio.run(scenario())
    assert ran == [] and svc.active == 0
    svc.close()
