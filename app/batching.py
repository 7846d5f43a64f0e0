"""Dynamic batching: one thread per model turns many small requests into few large forward passes.

The thread takes the first waiting request, then collects more until `max_batch` images or
`max_wait_s` have passed, runs one `predict` over the concatenation and hands each caller its own
slice. All model work (CUDA, faiss GPU resources) happens on that one thread (DESIGN section 5).

On a CPU a second lane may help under heavy load (`helper`): a thread that takes a batch only while the first
is busy and at least `helper_min_images` images wait, with a predict of its own (one intra-op thread), so two
batches run side by side instead of one on all cores with the Python between batches serialised. Light load
never reaches it, so small requests keep one lane (benchmarks/README.md measures both).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from app.logs import fields

log = logging.getLogger("app.batching")

Votes = tuple[Tensor, Tensor]  # (pred [B] int64, counts [B, C] int64) on the CPU; a tuple, unlike schemas.Prediction
PredictFn = Callable[[Tensor], Votes]


class WorkerClosed(RuntimeError):
    """The worker has stopped (server shutting down); the request was not run."""


class QueueFull(RuntimeError):
    """Too many images are waiting for a batch; the request was not queued (retry after `retry_after_s`)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    images: Tensor  # [n, 3, H, W] float in [0, 1]
    future: Future[Votes] = field(default_factory=Future)
    waiting: bool = False  # counted in BatchWorker._waiting (until taken into a batch or cancelled)


class BatchWorker:
    """Owns a thread that batches `submit`ted images through `predict` (built on that thread by `setup`)."""

    def __init__(self, name: str, setup: Callable[[], PredictFn], *, max_batch: int, max_wait_s: float,
                 max_queue: int | None = None, on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None, helper: Callable[[], PredictFn] | None = None,
                 helper_min_images: int = 1, on_death: Callable[[str], None] | None = None) -> None:
        """`max_queue`: images waiting (not yet in a batch) beyond which `submit` raises QueueFull;
        a job arriving at an empty queue is always taken, however large. None: unbounded.
        `helper`: the setup of a second lane's predict (run on that lane's thread), which takes a batch only
        while the first lane is busy and at least `helper_min_images` images wait. None: one lane.
        `on_death(name)`: called on the worker's thread once it has died and failed its callers."""
        if max_batch < 1 or max_wait_s < 0 or (max_queue is not None and max_queue < 1) or helper_min_images < 1:
            raise ValueError(f"max_batch, max_queue and helper_min_images must be >= 1 and max_wait_s >= 0, "
                             f"got {max_batch}, {max_queue}, {helper_min_images}, {max_wait_s}")
        self.name, self.max_batch, self.max_wait_s, self.max_queue = name, max_batch, max_wait_s, max_queue
        self.helper_min_images = helper_min_images
        # guards _closed, _waiting, _busy_since and the order of put(job) vs put(None); the helper waits on it
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._collecting = threading.Lock()  # one lane takes jobs off the queue at a time (and owns _carry)
        self._waiting = 0  # images submitted and not yet taken into a batch
        self._done = BatchDone(on_batch)
        self._busy_since: dict[int, float] = {}  # lane -> monotonic start of the batch it is running
        self._died = False  # the thread ended on an unexpected BaseException
        self._current: dict[int, list[_Job]] = {}  # lane -> the batch in progress
        self._setup, self._on_queue, self._on_death = setup, on_queue, on_death
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._carry: _Job | None = None  # a job that did not fit the previous batch
        self._ready = threading.Event()
        self._closed = False
        self._setup_error: BaseException | None = None
        # the predict `setup` built, once started: `app.loop_batching` runs it on the event loop (CPU only)
        self.predict: PredictFn | None = None
        self._thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)
        self._helper_setup = helper
        self._helper = threading.Thread(target=self._run_helper, name=f"batch-{name}-2", daemon=True)

    def start(self, timeout: float | None = None) -> None:
        """Start the thread and wait until `setup` has built the predictor; re-raise its error."""
        self._thread.start()
        self._ready.wait(timeout)
        if self._setup_error is not None:
            raise self._setup_error
        if not self._ready.is_set():
            raise TimeoutError(f"batch worker {self.name}: setup did not finish in {timeout} s")

    def submit(self, images: Tensor) -> Future[Votes]:
        """Queue images [n, 3, H, W] (n >= 1); the future resolves to this request's (pred [n], counts [n, C])."""
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"expected images [n>=1, 3, H, W], got {tuple(images.shape)}")
        job, n = _Job(images), images.shape[0]
        with self._lock:
            if self._closed or self._died:
                state = "closed" if self._closed else "dead"
                job.future.set_exception(WorkerClosed(f"batch worker {self.name} is {state}"))
                return job.future
            if self.max_queue is not None and self._waiting > 0 and self._waiting + n > self.max_queue:
                raise QueueFull(f"model {self.name!r} has {self._waiting} images waiting (limit {self.max_queue})",
                                self.retry_after())
            self._waiting += n
            job.waiting = True
            self._queue.put(job)
            if 0 in self._busy_since and self._waiting >= self.helper_min_images:
                self._cond.notify()  # the helper lane, if any, may take a batch now
        # a caller that gave up (deadline) frees its place at once, not when the worker reaches the job
        job.future.add_done_callback(lambda f: self._taken(job) if f.cancelled() else None)
        self._report_queue()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the images waiting now are likely through: batches ahead times the mean batch time."""
        return retry_after_s(self._waiting, self.max_batch, self._done.mean_s)

    def stop(self) -> None:
        """Refuse new jobs; the thread finishes those already queued, then ends (does not wait)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # under the lock: no job can be queued behind the stop marker
            self._cond.notify_all()  # the helper lane ends

    def close(self, timeout: float = 10.0) -> None:
        """`stop`, then wait up to `timeout` for the thread; if it is still busy (a stuck predict), every
        caller still waiting - the running batch included - gets WorkerClosed now, so none hangs."""
        self.stop()
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self._helper):
            if thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0))
        if self._thread.is_alive() or self._helper.is_alive():
            log.error("batch worker did not stop in time; failing its callers",
                      extra=fields(event="worker_stop_timeout", model=self.name, timeout_s=timeout))
            for jobs in list(self._current.values()):
                for job in jobs:
                    _fail(job, WorkerClosed(f"batch worker {self.name} is closed"))
            self._fail_waiting("closed")

    def state(self, stuck_after_s: float) -> str:
        """'ok', 'stuck' (a batch running longer than stuck_after_s), 'dead' (thread gone) or 'closed'."""
        if self._closed:
            return "closed"
        if self._died or (self._ready.is_set() and not self._thread.is_alive()):
            return "dead"
        busy = list(self._busy_since.values())
        if busy and time.monotonic() - min(busy) > stuck_after_s:
            return "stuck"
        return "ok"

    @property
    def lanes(self) -> int:
        """Batch lanes running: 1, or 2 with a helper lane whose setup succeeded."""
        return 1 + self._helper.is_alive()

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
        self.predict = predict
        if self._helper_setup is not None:
            self._helper.start()
        self._ready.set()
        stop = False
        try:
            while not stop:
                with self._collecting:
                    jobs, stop = self._collect()
                if jobs:
                    self._process(predict, jobs, lane=0)
        except BaseException:  # not an Exception of predict (those fail their batch only): the thread ends
            log.critical("batch worker died", exc_info=True, extra=fields(event="worker_died", model=self.name))
            with self._lock:
                self._died = True
                self._cond.notify_all()
            self._fail_waiting("dead")
            if self._on_death is not None:
                self._on_death(self.name)
            return
        if self._helper.is_alive():  # stop() woke it; wait for its batch before failing what is left
            self._helper.join()
        self._fail_waiting("closed")

    def _run_helper(self) -> None:
        """The second lane: a batch of what waits, only while lane 0 is busy and enough images wait. A failed
        setup leaves one lane (logged); an unexpected BaseException ends this lane only."""
        assert self._helper_setup is not None
        try:
            predict = self._helper_setup()
        except Exception:
            log.exception("second batch lane not started", extra=fields(event="helper_setup_failed", model=self.name))
            return
        try:
            while True:
                with self._lock:
                    self._cond.wait_for(lambda: self._closed or self._died or (
                        0 in self._busy_since and self._waiting >= self.helper_min_images))
                    if self._closed or self._died:
                        return
                with self._collecting:
                    jobs, stop = self._collect(block=False)
                if stop:
                    self._queue.put(None)  # the stop marker is lane 0's: hand it back
                    return
                if jobs:
                    self._process(predict, jobs, lane=1)
        except BaseException:
            log.critical("second batch lane died", exc_info=True, extra=fields(event="helper_died", model=self.name))

    def _fail_waiting(self, state: str) -> None:
        """Fail whatever is left rather than leave callers waiting forever."""
        jobs = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                jobs.append(job)
        for job in jobs:
            self._taken(job)
            _fail(job, WorkerClosed(f"batch worker {self.name} is {state}"))

    def _collect(self, block: bool = True) -> tuple[list[_Job], bool]:
        """Block for a first job (`block`; else take only what waits), then gather until max_batch images or
        max_wait_s (0 when not blocking). Returns (jobs, stop). Call it holding `_collecting`."""
        if self._carry is not None:
            first: _Job | None = self._carry
        elif block:
            first = self._queue.get()
        else:
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                return [], False
        self._carry = None
        if first is None:
            return [], True
        jobs, n = [first], first.images.shape[0]
        self._taken(first)
        deadline = time.monotonic() + (self.max_wait_s if block else 0.0)
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
            self._taken(nxt)
        self._report_queue()
        return [j for j in jobs if j.future.set_running_or_notify_cancel()], stop

    def _taken(self, job: _Job) -> None:
        with self._lock:
            if job.waiting:
                job.waiting = False
                self._waiting -= job.images.shape[0]

    def _process(self, predict: PredictFn, jobs: list[_Job], lane: int) -> None:
        t0 = time.perf_counter()
        self._current[lane] = jobs
        with self._lock:
            self._busy_since[lane] = time.monotonic()
            if lane == 0 and self._waiting >= self.helper_min_images:
                self._cond.notify_all()  # enough is waiting behind this batch for the helper lane
        try:
            answers = run_batch(predict, [j.images for j in jobs], self.max_batch)
        except Exception as e:
            log.exception("batch failed", extra=fields(event="batch_failed", model=self.name, jobs=len(jobs)))
            for j in jobs:
                _fail(j, e)
            return
        except BaseException:
            if lane == 0:  # the worker's thread ends: readiness says so before the batch's callers hear of it
                with self._lock:
                    self._died = True
                    self._cond.notify_all()
            for j in jobs:
                _fail(j, WorkerClosed(f"batch worker {self.name} died"))
            raise
        finally:
            with self._lock:
                self._busy_since.pop(lane, None)
            self._current.pop(lane, None)
        self._done([j.images.shape[0] for j in jobs], time.perf_counter() - t0, [j.future for j in jobs], answers)


class _Settable(Protocol):
    def done(self) -> bool: ...
    def set_result(self, result: Votes, /) -> None: ...


class BatchDone:
    """What follows a batch in both batchers (the worker's thread and `app.loop_batching`): the running mean of a
    batch's time (for Retry-After), the metrics hook, and each request's answer to its future."""

    def __init__(self, on_batch: Callable[[int, float], None] | None) -> None:
        self.mean_s = 0.0
        self._on_batch = on_batch

    def __call__(self, sizes: list[int], seconds: float, futures: Sequence[_Settable], answers: list[Votes]) -> None:
        """A batch of requests of `sizes` images took `seconds`; set `futures` to `answers` (one each, in order),
        skipping a future already done (failed by close, or cancelled)."""
        self.mean_s = seconds if self.mean_s == 0 else 0.8 * self.mean_s + 0.2 * seconds
        if self._on_batch is not None:
            self._on_batch(sum(sizes), seconds)
        for future, answer in zip(futures, answers, strict=True):
            if not future.done():
                future.set_result(answer)


def retry_after_s(waiting: int, max_batch: int, batch_s: float) -> int:
    """Seconds until `waiting` images are likely through: batches ahead (and the one running) times the mean
    batch time `batch_s`, within 1..30 (the Retry-After of a 429)."""
    return int(min(max(math.ceil((waiting / max_batch + 1) * batch_s), 1), 30))


def run_batch(predict: PredictFn, images: list[Tensor], max_batch: int) -> list[Votes]:
    """One batch of several requests' images [n_i, 3, H, W]: `predict` over their concatenation (in chunks of at
    most `max_batch`: a lone oversized request), each request's slice of the answer in order. Shared by the batch
    worker's thread and `app.loop_batching`."""
    x = torch.cat(images) if len(images) > 1 else images[0]
    parts = [predict(chunk) for chunk in x.split(max_batch)]
    pred = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
    counts = torch.cat([c for _, c in parts]) if len(parts) > 1 else parts[0][1]
    answers, i = [], 0
    for im in images:
        n = im.shape[0]
        answers.append((pred[i:i + n], counts[i:i + n]))
        i += n
    return answers


def _fail(job: _Job, error: BaseException) -> None:
    """Fail a job that is running or queued; a no-op when it is already done (a race with close)."""
    if job.future.done():
        return
    try:
        if job.future.running() or job.future.set_running_or_notify_cancel():
            job.future.set_exception(error)
    except InvalidStateError:
        pass
