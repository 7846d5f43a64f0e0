"""BatchWorker: requests queued together go through one predict call; each caller gets its slice."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch import Tensor

from app.batching import BatchWorker, Votes, WorkerClosed


def recording_worker(max_batch: int, max_wait_s: float = 0.05, fail: bool = False):
    """A worker whose predict returns each image's first pixel * 100 as its 'class' and records batch sizes."""
    calls: list[int] = []
    batches: list[int] = []

    def setup():
        def predict(x: Tensor) -> Votes:
            calls.append(x.shape[0])
            if fail:
                raise RuntimeError("model exploded")
            pred = (x[:, 0, 0, 0] * 100).round().long()
            return pred, torch.nn.functional.one_hot(pred, 100)
        return predict

    w = BatchWorker("t", setup, max_batch=max_batch, max_wait_s=max_wait_s,
                    on_batch=lambda n, s: batches.append(n))
    return w, calls, batches


def images(*values: int) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).div(100).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()


def test_queued_requests_share_one_batch() -> None:
    w, calls, batches = recording_worker(max_batch=64)
    futures = [w.submit(images(i)) for i in range(8)]  # queued before the thread starts
    w.start()
    assert [int(f.result(5)[0][0]) for f in futures] == list(range(8))
    assert calls == [8] and batches == [8]
    w.close()


def test_max_batch_is_respected_and_jobs_stay_whole() -> None:
    w, calls, _ = recording_worker(max_batch=4)
    futures = [w.submit(images(1, 2)), w.submit(images(3)), w.submit(images(4, 5)), w.submit(images(6))]
    w.start()
    results = [f.result(5)[0].tolist() for f in futures]
    assert results == [[1, 2], [3], [4, 5], [6]]
    assert calls == [3, 3]  # [1,2]+[3] then [4,5]+[6]: the job that did not fit waits for the next batch
    w.close()


def test_oversized_job_is_chunked() -> None:
    w, calls, batches = recording_worker(max_batch=4)
    fut = w.submit(images(*range(10)))
    w.start()
    pred, counts = fut.result(5)
    assert pred.tolist() == list(range(10)) and counts.shape == (10, 100)
    assert calls == [4, 4, 2] and batches == [10]
    w.close()


def test_zero_wait_takes_only_what_is_queued() -> None:
    w, calls, _ = recording_worker(max_batch=64, max_wait_s=0)
    w.start()
    assert w.submit(images(7)).result(5)[0].tolist() == [7]
    assert calls == [1]
    w.close()


def test_zero_wait_batches_what_arrived_while_busy() -> None:
    """Continuous batching (the default, max_wait 0): an idle worker runs a lone job at once, and the
    jobs that queue up while it is busy go through together in the next batch."""
    release, started, calls = threading.Event(), threading.Event(), []

    def setup():
        def predict(x: Tensor) -> Votes:
            calls.append(x.shape[0])
            started.set()
            release.wait(5)  # the first batch holds the worker until the others are queued
            pred = (x[:, 0, 0, 0] * 100).round().long()
            return pred, torch.nn.functional.one_hot(pred, 100)
        return predict

    w = BatchWorker("t", setup, max_batch=64, max_wait_s=0)
    w.start()
    release.set()
    w.submit(images(0)).result(5)  # the warm-up: nothing else queued
    release.clear()
    started.clear()
    first = w.submit(images(1))
    assert started.wait(5)  # dispatched without waiting for company
    rest = [w.submit(images(i)) for i in range(2, 7)]
    release.set()
    assert [int(f.result(5)[0][0]) for f in (first, *rest)] == list(range(1, 7))
    assert calls == [1, 1, 5]
    w.close()


def test_predict_error_reaches_every_caller() -> None:
    w, _, _ = recording_worker(max_batch=64, fail=True)
    futures = [w.submit(images(i)) for i in range(3)]
    w.start()
    for f in futures:
        with pytest.raises(RuntimeError, match="exploded"):
            f.result(5)
    w.close()


def test_a_dying_worker_fails_its_callers_then_reports_its_death_once() -> None:
    deaths: list[str] = []
    called_after: list[bool] = []
    futures = []

    def setup():
        def predict(x: Tensor) -> Votes:
            raise SystemExit("the thread ends")
        return predict

    def on_death(name: str) -> None:
        deaths.append(name)
        called_after.append(all(f.done() for f in futures))

    w = BatchWorker("m", setup, max_batch=1, max_wait_s=0, on_death=on_death)
    futures += [w.submit(images(i)) for i in range(3)]  # one runs (and dies), two wait behind it
    # what the running batch's caller sees when its answer arrives (the callback runs in the worker's thread as the
    # future fails): a server answering that caller 503 and then its readiness probe must not say "ok"
    state_at_answer: list[str] = []
    futures[0].add_done_callback(lambda _f: state_at_answer.append(w.state(10)))
    w.start()
    for f in futures:
        with pytest.raises(WorkerClosed):
            f.result(5)
    assert w.state(10) == "dead" and state_at_answer == ["dead"]  # set before its callers fail
    w.close()  # joins the thread: on_death has returned
    assert deaths == ["m"] and called_after == [True]


def test_setup_error_is_raised_by_start() -> None:
    def setup():
        raise ValueError("bad artifact")

    w = BatchWorker("t", setup, max_batch=1, max_wait_s=0)
    with pytest.raises(ValueError, match="bad artifact"):
        w.start(timeout=5)


def test_closed_worker_fails_fast() -> None:
    w, _, _ = recording_worker(max_batch=8)
    w.start()
    w.close()
    with pytest.raises(WorkerClosed):
        w.submit(images(1)).result(1)


def test_concurrent_submitters_get_their_own_rows() -> None:
    w, _, batches = recording_worker(max_batch=16, max_wait_s=0.01)
    w.start()
    out: dict[int, list[int]] = {}

    def client(i: int) -> None:
        out[i] = w.submit(images(i, i + 50)).result(5)[0].tolist()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == {i: [i, i + 50] for i in range(40)}
    assert sum(batches) == 80 and max(batches) <= 16
    w.close()


def test_rejects_bad_shapes() -> None:
    w, _, _ = recording_worker(max_batch=4)
    with pytest.raises(ValueError):
        w.submit(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError):
        BatchWorker("t", lambda: None, max_batch=0, max_wait_s=0)  # type: ignore[arg-type, return-value]


def test_worker_keeps_serving_after_failing_batches() -> None:
    # an intermittently failing model (every other batch raises): each failure reaches only its own callers,
    # and the worker thread goes on serving the batches after it (issue 13's fault list)
    calls: list[int] = []

    def setup():
        def predict(x: Tensor) -> Votes:
            calls.append(x.shape[0])
            if len(calls) % 2:
                raise RuntimeError(f"flaky batch {len(calls)}")
            pred = (x[:, 0, 0, 0] * 100).round().long()
            return pred, torch.nn.functional.one_hot(pred, 100)
        return predict

    w = BatchWorker("t", setup, max_batch=8, max_wait_s=0)
    w.start(timeout=5)
    try:
        for i in range(3):
            with pytest.raises(RuntimeError, match=f"flaky batch {2 * i + 1}"):
                w.submit(images(7)).result(5)
            pred, _ = w.submit(images(i, 40 + i)).result(5)
            assert pred.tolist() == [i, 40 + i]
        assert calls == [1, 2] * 3
    finally:
        w.close()


def two_lane_worker(min_images: int, max_batch: int = 4, helper_fails: bool = False):
    """A worker with a second lane; lane 0 blocks in predict until `release` is set. Records (lane, batch size)."""
    release = threading.Event()
    started = threading.Event()
    runs: list[tuple[str, int]] = []

    def make(lane: str, block: bool):
        def setup():
            if lane == "helper" and helper_fails:
                raise RuntimeError("no second session")

            def predict(x: Tensor) -> Votes:
                if block and x.shape[0] > 0 and x[0, 0, 0, 0] > 0:  # the warm-up-free toy: image 0 never blocks
                    started.set()
                    assert release.wait(5)
                runs.append((lane, x.shape[0]))
                pred = (x[:, 0, 0, 0] * 100).round().long()
                return pred, torch.nn.functional.one_hot(pred, 100)
            return predict
        return setup

    w = BatchWorker("t", make("main", True), max_batch=max_batch, max_wait_s=0, helper=make("helper", False),
                    helper_min_images=min_images)
    return w, runs, started, release


def test_second_lane_takes_a_batch_only_while_the_first_is_busy_and_enough_waits() -> None:
    w, runs, started, release = two_lane_worker(min_images=3)
    w.start()
    assert w.lanes == 2
    first = w.submit(images(1))
    assert started.wait(5)  # lane 0 is busy with [1]
    second = w.submit(images(2, 3))  # 2 images wait: below the helper's threshold
    assert not second.done() and runs == []
    third = w.submit(images(4))  # 3 wait: the helper takes them while lane 0 is still busy
    assert [int(v) for v in third.result(5)[0]] == [4]
    assert second.result(5)[0].tolist() == [2, 3]
    assert runs == [("helper", 3)] and not first.done()
    release.set()
    assert first.result(5)[0].tolist() == [1]
    assert runs == [("helper", 3), ("main", 1)]
    w.close()
    assert not w._helper.is_alive() and not w._thread.is_alive()


def test_light_load_never_reaches_the_second_lane() -> None:
    w, runs, _, release = two_lane_worker(min_images=2)
    release.set()  # lane 0 never blocks: each request is done before the next
    w.start()
    for i in range(1, 20):
        assert w.submit(images(i)).result(5)[0].tolist() == [i]
    assert runs == [("main", 1)] * 19
    w.close()


def test_close_with_a_busy_second_lane_loses_no_caller() -> None:
    w, runs, started, release = two_lane_worker(min_images=1, max_batch=2)
    w.start()
    futures = [w.submit(images(1))]
    assert started.wait(5)
    futures += [w.submit(images(i)) for i in range(2, 12)]
    threading.Timer(0.2, release.set).start()
    w.close(timeout=5)
    # every caller has an answer (its own row) or WorkerClosed: none hangs
    for i, f in enumerate(futures, start=1):
        with contextlib.suppress(WorkerClosed):
            assert f.result(5)[0].tolist() == [i]
    assert sum(n for _, n in runs) == sum(f.exception() is None for f in futures)
    assert not w._helper.is_alive() and not w._thread.is_alive()


def test_a_second_lane_that_fails_setup_leaves_one_lane(caplog: pytest.LogCaptureFixture) -> None:
    w, runs, _, release = two_lane_worker(min_images=1, helper_fails=True)
    release.set()
    w.start()
    w._helper.join(5)
    assert w.lanes == 1 and "second batch lane not started" in caplog.text
    assert w.submit(images(7)).result(5)[0].tolist() == [7] and runs == [("main", 1)]
    w.close()
