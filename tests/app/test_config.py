"""Settings: defaults, SATML_* environment, invariants."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import MAX_ATTACK_EPS, Settings


def test_defaults() -> None:
    s = Settings()
    assert (s.default_model, s.device, s.runtime, s.index) == ("default", "auto", "auto", "auto")
    assert (s.max_batch, s.max_wait_ms, s.attack_max_steps, s.attack_concurrency, s.attack_queue) == (64, 0, 100, 1, 8)
    assert s.attack_max_eps == pytest.approx(16 / 255)
    assert s.api_key is None and s.cors_origins == [] and s.host == "127.0.0.1"


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SATML_MAX_BATCH", "8")
    monkeypatch.setenv("SATML_RUNTIME", "onnxruntime")
    monkeypatch.setenv("SATML_CORS_ORIGINS", '["http://localhost:3000"]')
    monkeypatch.setenv("SATML_API_KEY", "s3cret")
    monkeypatch.setenv("SATML_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.max_batch == 8 and s.runtime == "onnxruntime" and s.cors_origins == ["http://localhost:3000"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    assert s.log_level == "debug"


def test_empty_api_key_means_open() -> None:
    assert Settings(api_key="  ").api_key is None


@pytest.mark.parametrize("kw", [
    {"attack_max_eps": 0.1},  # above 16/255
    {"attack_max_eps": 0},
    {"attack_max_steps": 101},
    {"max_batch": 0},
    {"max_wait_ms": -1},
    {"attack_timeout_s": 0},
    {"device": "tpu"},
    {"index": "faiss-gpu", "device": "cpu"},
    {"default_model": "../etc"},
    {"port": 70000},
])
def test_invariants(kw: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**kw)


def test_eps_limit_is_design_bound() -> None:
    assert Settings(attack_max_eps=MAX_ATTACK_EPS).attack_max_eps == MAX_ATTACK_EPS


def test_threads_per_process_shares_the_cores_between_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert Settings(workers=1).threads_per_process() is None, "one process: torch's own default"
    assert Settings(workers=2, loop_batching="off").threads_per_process() == 2
    assert Settings(workers=8, loop_batching="off").threads_per_process() == 1
    assert Settings(workers=2, compute_threads=3).threads_per_process() == 3
    # batching on the loop (auto with several processes): every core for a lone request, one for loaded batches
    assert Settings(workers=2).threads_per_process() is None


def test_loop_batching_is_on_with_several_processes_unless_set() -> None:
    assert not Settings().batches_on_loop() and Settings(workers=2).batches_on_loop()
    assert not Settings(workers=2, loop_batching="off").batches_on_loop()
    assert Settings(loop_batching="on").batches_on_loop()
    # on the loop every batch is "small" (one thread while other requests are in progress)
    assert Settings(workers=2, max_batch=64, small_batch_max=16).small_batch_limit() == 64
    assert Settings(max_batch=64, small_batch_max=16).small_batch_limit() == 16


def test_auto_workers_is_one_process_inside_an_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` (the default) is resolved by satml-serve before it starts several processes; an app built any other
    way (tests, a Ray Serve replica) is one process: no loop batching, no per-process thread split."""
    monkeypatch.setenv("SATML_WORKERS", "auto")
    assert Settings().workers == "auto" and Settings().processes() == 1
    assert not Settings().batches_on_loop() and Settings().threads_per_process() is None
    monkeypatch.setenv("SATML_WORKERS", "2")
    assert Settings().workers == 2 and Settings().processes() == 2 and Settings().batches_on_loop()
    monkeypatch.setenv("SATML_WORKERS", "several")
    with pytest.raises(ValueError, match="workers"):
        Settings()


def test_added_examples_need_one_process(tmp_path: Path) -> None:
    """Several processes would each rewrite the same overlay and lose each other's acknowledged examples."""
    with pytest.raises(ValueError, match="needs one process"):
        Settings(workers=2, state_dir=tmp_path)
    assert Settings(workers=1, state_dir=tmp_path).state_dir == tmp_path
    assert Settings(workers=2).state_dir is None
    assert Settings(state_dir=tmp_path).state_dir == tmp_path, "auto (the default) takes one process with a state dir"
