"""Dynamic batching: one thread per model turns many small requests into few large forward passes.

The thread takes the first waiting request, then collects more until `max_batch` images or
`max_wait_s` have passed, runs one `predict` over the concatenation and hands each caller its own
slice. All model work (CUDA, faiss GPU resources) happens on that one thread (DESIGN section 5).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.logs import fields

log = logging.getLogger("app.batching")

Prediction = tuple[Tensor, Tensor]  # (pred [B] int64, counts [B, C] int64), on the CPU
PredictFn = Callable[[Tensor], Prediction]


class WorkerClosed(RuntimeError):
    """The worker has stopped (server shutting down); the request was not run."""


@dataclass
class _Job:
    images: Tensor  # [n, 3, H, W] float in [0, 1]
    future: Future[Prediction] = field(default_factory=Future)


class BatchWorker:
    """Owns a thread that batches `submit`ted images through `predict` (built on that thread by `setup`)."""

    def __init__(self, name: str, setup: Callable[[], PredictFn], *, max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.name, self.max_batch, self.max_wait_s = name, max_batch, max_wait_s
        self._setup, self._on_batch, self._on_queue = setup, on_batch, on_queue
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._carry: _Job | None = None  # a job that did not fit the previous batch
        self._ready = threading.Event()
        self._closed = False
        self._setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)

    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until `setup` has built the predictor; re-raise its error."""
        self._thread.start()
        self._ready.wait(timeout)
        if self._setup_error is not None:
            raise self._setup_error
        if not self._ready.is_set():
            raise TimeoutError(f"batch worker {self.name}: setup did not finish in {timeout} s")

    def submit(self, images: Tensor) -> Future[Prediction]:
        """Queue images [n, 3, H, W] (n >= 1); the future resolves to this request's (pred [n], counts [n, C])."""
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"expected images [n>=1, 3, H, W], got {tuple(images.shape)}")
        job = _Job(images)
        if self._closed:
            job.future.set_exception(WorkerClosed(f"batch worker {self.name} is closed"))
            return job.future
        self._queue.put(job)
        self._report_queue()
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the jobs already queued; jobs submitted later fail at once."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def _report_queue(self) -> None:
        if self._on_queue is not None:
            self._on_queue(self.depth)

    def _run(self) -> None:
        try:
            predict = self._setup()
        except BaseException as e:
            self._setup_error = e
            self._ready.set()
            return
        self._ready.set()
        stop = False
        while not stop:
            jobs, stop = self._collect()
            if jobs:
                self._process(predict, jobs)
        # fail whatever is left rather than leave callers waiting forever
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerClosed(f"batch worker {self.name} is closed"))

    def _collect(self) -> tuple[list[_Job], bool]:
        """Block for a first job, then gather until max_batch images or max_wait_s. Returns (jobs, stop)."""
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is None:
            return [], True
        jobs, n = [first], first.images.shape[0]
        deadline = time.monotonic() + self.max_wait_s
        stop = False
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                stop = True
                break
            if n + nxt.images.shape[0] > self.max_batch:
                self._carry = nxt
                break
            jobs.append(nxt)
            n += nxt.images.shape[0]
        self._report_queue()
        return [j for j in jobs if j.future.set_running_or_notify_cancel()], stop

    def _process(self, predict: PredictFn, jobs: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            x = torch.cat([j.images for j in jobs])  # N x 3 x H x W
            parts = [predict(chunk) for chunk in x.split(self.max_batch)]  # a lone oversized job is chunked
            pred = torch.cat([p for p, _ in parts])
            counts = torch.cat([c for _, c in parts])
        except Exception as e:
            log.exception("batch failed", extra=fields(event="batch_failed", model=self.name, jobs=len(jobs)))
            for j in jobs:
                j.future.set_exception(e)
            return
        if self._on_batch is not None:
            self._on_batch(x.shape[0], time.perf_counter() - t0)
        i = 0
        for j in jobs:
            n = j.images.shape[0]
            j.future.set_result((pred[i:i + n], counts[i:i + n]))
            i += n
