"""LoopBatcher: requests gathered on the event loop run as one predict there; each caller gets its slice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from app.batching import QueueFull, Votes, WorkerClosed
from app.loop_batching import LoopBatcher


def images(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).div(100).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()


class Recorder:
    """A predict returning each image's first pixel * 100 as its class; records the batch sizes it saw."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, x: Tensor) -> Votes:
        self.calls.append(x.shape[0])
        if self.fail:
            raise RuntimeError("model exploded")
        pred = (x[:, 0, 0, 0] * 100).round().long()
        return pred, torch.nn.functional.one_hot(pred, 100)


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())  # type: ignore[arg-type]


async def request(b: LoopBatcher, *values: int) -> list[int]:
    """One request as a route makes it: a coroutine that submits, then awaits its answer."""
    pred, counts = await b.submit(images(*values))
    assert counts.shape == (len(values), 100)
    return pred.tolist()


def test_requests_of_one_pass_share_one_batch() -> None:
    rec, batches = Recorder(), []
    b = LoopBatcher("t", rec, max_batch=64, on_batch=lambda n, s: batches.append(n))

    async def scenario() -> list[list[int]]:
        return await asyncio.gather(*[request(b, i) for i in range(8)])

    assert run(scenario) == [[i] for i in range(8)]
    assert rec.calls == [8] and batches == [8]


@pytest.mark.parametrize(("passes", "calls"), [(1, [2]), (2, [1, 1])])
def test_the_batch_gathers_while_passes_of_the_loop_add_requests(passes: int, calls: list[int]) -> None:
    """A request submitted one pass of the loop after the first joins its batch; one that comes after a pass that
    added nothing goes in the next batch (the batch never waits on I/O or a timer)."""
    rec = Recorder()
    b = LoopBatcher("t", rec, max_batch=64)

    async def late() -> list[int]:
        for _ in range(passes):
            await asyncio.sleep(0)
        return await request(b, 9)

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(request(b, 1), late()))

    assert run(scenario) == [[1], [9]] and rec.calls == calls


def test_a_lone_request_runs_without_waiting_for_io() -> None:
    """Nothing else pending: the batch runs within a couple of passes, long before a timer would fire."""
    rec = Recorder()
    b = LoopBatcher("t", rec, max_batch=64)

    async def scenario() -> tuple[list[int], bool]:
        timer = asyncio.ensure_future(asyncio.sleep(0.05))
        got = await request(b, 5)
        return got, timer.done()

    assert run(scenario) == ([5], False)


def test_max_batch_is_respected_and_jobs_stay_whole() -> None:
    rec = Recorder()
    b = LoopBatcher("t", rec, max_batch=4)

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(request(b, 1, 2), request(b, 3), request(b, 4, 5), request(b, 6)))

    assert run(scenario) == [[1, 2], [3], [4, 5], [6]]
    assert rec.calls == [3, 3]  # [1,2]+[3], then the job that did not fit with [6]


def test_an_oversized_job_is_chunked() -> None:
    rec = Recorder()
    b = LoopBatcher("t", rec, max_batch=4)
    assert run(lambda: request(b, *range(10))) == list(range(10))
    assert rec.calls == [4, 4, 2]


def test_a_full_queue_refuses_with_retry_after() -> None:
    b = LoopBatcher("t", Recorder(), max_batch=4, max_queue=3)

    async def scenario() -> QueueFull:
        first = b.submit(images(1, 2))
        with pytest.raises(QueueFull) as e:
            b.submit(images(3, 4))
        await first
        return e.value

    err = run(scenario)
    assert "2 images waiting (limit 3)" in str(err) and 1 <= err.retry_after_s <= 30
    lone = LoopBatcher("t", Recorder(), max_batch=4, max_queue=3)
    assert run(lambda: request(lone, *range(5))) == list(range(5)), "a job at an empty queue is always taken"


def test_a_request_that_gave_up_is_not_computed() -> None:
    rec = Recorder()
    b = LoopBatcher("t", rec, max_batch=64)

    async def scenario() -> list[int]:
        gone = b.submit(images(1))
        gone.cancel()  # as asyncio.wait_for does on a timeout
        return await request(b, 2)

    assert run(scenario) == [2] and rec.calls == [1]


def test_a_failing_batch_fails_its_requests_only() -> None:
    rec = Recorder(fail=True)
    b = LoopBatcher("t", rec, max_batch=64)

    async def scenario() -> tuple[list[Any], list[int]]:
        failed = list(await asyncio.gather(request(b, 1), request(b, 2), return_exceptions=True))
        rec.fail = False
        return failed, await request(b, 3)

    failed, after = run(scenario)
    assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in failed)
    assert after == [3] and rec.calls == [2, 1]


def test_close_fails_what_waits_and_refuses_new_requests() -> None:
    rec, depths = Recorder(), list[int]()
    b = LoopBatcher("t", rec, max_batch=64, on_queue=depths.append)

    async def scenario() -> tuple[BaseException | None, BaseException | None]:
        waiting = b.submit(images(1))
        b.close()
        late = b.submit(images(2))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return waiting.exception(), late.exception()

    waiting, late = run(scenario)
    assert isinstance(waiting, WorkerClosed) and isinstance(late, WorkerClosed)
    assert rec.calls == [] and depths == [1, 0]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        LoopBatcher("t", Recorder(), max_batch=0)
    b = LoopBatcher("t", Recorder(), max_batch=4)

    async def scenario() -> None:
        b.submit(torch.zeros(0, 3, 2, 2))

    with pytest.raises(ValueError, match="expected images"):
        run(scenario)
