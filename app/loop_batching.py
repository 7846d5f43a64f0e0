"""Batching on the event loop (`SATML_LOOP_BATCHING`): a model's requests gathered and run on the loop's own thread.

Through the batch worker (app.batching) every request crosses threads twice: the loop hands its images to the
worker's thread, and the worker wakes the loop with the answer. On a 2-core machine the loop, the worker and the
onnxruntime pool then share two cores and one GIL, and a request's path is a chain of hand-offs. With several
server processes (`SATML_WORKERS`), each has a loop of its own, and a process can run its batches where it gathers
them: the requests the loop has read are collected until a pass of the loop adds none (it never waits for I/O to
do so), the model runs once over them on the loop, and their futures get the answers without a thread hop. The
loop is blocked meanwhile; the other process keeps the other core busy. Measured in benchmarks/README.md.

Only on a CPU: CUDA and faiss GPU work stays on the batch worker's thread (DESIGN section 5). /attack and
/certify, which submit from threads of their own, keep the worker; so does everything when this is off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from app.batching import BatchDone, PredictFn, QueueFull, Votes, WorkerClosed, retry_after_s, run_batch
from app.logs import fields

log = logging.getLogger("app.loop_batching")


@dataclass
class _Job:
    images: Tensor  # [n, 3, H, W] float in [0, 1]
    future: asyncio.Future[Votes]


class LoopBatcher:
    """Collects one model's requests on the running event loop and runs `predict` over them there, in batches of
    at most `max_batch` images (jobs kept whole; a lone larger job is run in chunks)."""

    def __init__(self, name: str, predict: PredictFn, *, max_batch: int, max_queue: int | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        """`max_queue`: images waiting beyond which `submit` raises QueueFull (a job arriving at an empty queue is
        always taken). `on_batch(images, seconds)` and `on_queue(jobs waiting)`: the worker's metrics hooks."""
        if max_batch < 1 or (max_queue is not None and max_queue < 1):
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.name, self.max_batch, self.max_queue = name, max_batch, max_queue
        self._predict, self._on_queue = predict, on_queue
        self._jobs: list[_Job] = []
        self._waiting = 0  # images in _jobs
        self._seen = -1  # images waiting at the previous pass of the loop (-1: no pass yet)
        self._scheduled = False  # a _flush is on the loop's ready queue
        self._done = BatchDone(on_batch)
        self._closed = False

    def submit(self, images: Tensor) -> asyncio.Future[Votes]:
        """Queue images [n, 3, H, W] (n >= 1) from a coroutine on the loop; the future resolves to this request's
        (pred [n], packed output [n, ...]). QueueFull when too many images wait."""
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"expected images [n>=1, 3, H, W], got {tuple(images.shape)}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Votes] = loop.create_future()
        if self._closed:
            future.set_exception(WorkerClosed(f"model {self.name!r} is closed"))
            return future
        n = images.shape[0]
        if self.max_queue is not None and self._waiting > 0 and self._waiting + n > self.max_queue:
            raise QueueFull(f"model {self.name!r} has {self._waiting} images waiting (limit {self.max_queue})",
                            self.retry_after())
        self._jobs.append(_Job(images, future))
        self._waiting += n
        if not self._scheduled:
            self._scheduled, self._seen = True, -1
            loop.call_soon(self._flush)
        self._report_queue()
        return future

    def retry_after(self) -> int:
        """Seconds until the images waiting now are likely through (as `BatchWorker.retry_after`)."""
        return retry_after_s(self._waiting, self.max_batch, self._done.mean_s)

    def close(self) -> None:
        """Refuse new jobs and fail those waiting with WorkerClosed (server shutdown)."""
        self._closed = True
        jobs, self._jobs, self._waiting = self._jobs, [], 0
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(WorkerClosed(f"model {self.name!r} is closed"))
        self._report_queue()

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def _report_queue(self) -> None:
        if self._on_queue is not None:
            self._on_queue(self.depth)

    def _flush(self) -> None:
        """Run on the loop: wait one more pass while the waiting images still grow (below max_batch), then run a
        batch; what is left waits for the next pass, so the loop serves its I/O between batches."""
        if not self._jobs:  # close() took them
            self._scheduled = False
            return
        loop = asyncio.get_running_loop()
        if self._seen < self._waiting < self.max_batch:
            self._seen = self._waiting
            loop.call_soon(self._flush)
            return
        take, n = 0, 0
        while take < len(self._jobs) and (take == 0 or n + self._jobs[take].images.shape[0] <= self.max_batch):
            n += self._jobs[take].images.shape[0]
            take += 1
        jobs, self._jobs = self._jobs[:take], self._jobs[take:]
        self._waiting -= n
        if self._jobs:  # more than one batch waits: the next one after this pass of the loop
            self._seen = -1
            loop.call_soon(self._flush)
        else:
            self._scheduled = False
        self._report_queue()
        self._run([j for j in jobs if not j.future.done()])  # a request that timed out meanwhile is skipped

    def _run(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            answers = run_batch(self._predict, [j.images for j in jobs], self.max_batch)
        except Exception as e:  # this batch's requests fail; the next batch runs as usual
            log.exception("batch failed", extra=fields(event="batch_failed", model=self.name, jobs=len(jobs)))
            for j in jobs:
                j.future.set_exception(e)
            return
        self._done([j.images.shape[0] for j in jobs], time.perf_counter() - t0, [j.future for j in jobs], answers)
