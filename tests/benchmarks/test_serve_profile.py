"""benchmarks/serve_profile.py: py-spy's raw stacks summarised per thread (the profile run itself needs py-spy's
ptrace access and a real server, so it is run by hand, not here)."""

from __future__ import annotations

import pytest

from tests.benchmarks.conftest import load_script

serve_profile = load_script("serve_profile")

RAW = [
    "thread (0x1): MainThread;run (runners.py:118);classify (app/routes/classify.py:64);decode (app/images.py:10) 6",
    "thread (0x1): MainThread;run (runners.py:118);classify (app/routes/classify.py:70) 3",
    "thread (0x1): MainThread;run (runners.py:118) 1",
    "thread (0x2): batch-default;_run (app/batching.py:200);predict (app/predictor.py:116);"
    "predict (app/predictor.py:121) 8",
    "thread (0x3): batch-default;_run (app/batching.py:201) 2",
    "garbage line",
]


def test_frames_collapse_to_function_and_file() -> None:
    assert serve_profile.frame_key("classify (app/routes/classify.py:64)") == "classify (classify.py)"
    assert serve_profile.frame_key("<module>") == "<module>"


def test_aggregate_counts_each_function_once_per_sample_and_sums_threads_of_one_name() -> None:
    threads = serve_profile.aggregate(RAW)
    assert set(threads) == {"MainThread", "batch-default"}
    main = threads["MainThread"]
    assert main.samples == 10
    assert main.inclusive["run (runners.py)"] == 10 and main.inclusive["classify (classify.py)"] == 9
    assert main.self_ == {"decode (images.py)": 6, "classify (classify.py)": 3, "run (runners.py)": 1}
    worker = threads["batch-default"]  # two thread ids of one name, summed
    assert worker.samples == 10
    assert worker.inclusive["predict (predictor.py)"] == 8  # recursion (two frames) counted once per sample
    assert worker.self_["predict (predictor.py)"] == 8 and worker.self_["_run (batching.py)"] == 2


def test_markdown_ranks_threads_and_gives_shares_of_each_thread() -> None:
    md = serve_profile.markdown(serve_profile.aggregate(RAW), ["# head"], top=5)
    assert md.startswith("# head\n")
    assert "| MainThread | 10 | 50.0 % |" in md and "| batch-default | 10 | 50.0 % |" in md
    assert "| `classify (classify.py)` | 90.0 % | 30.0 % |" in md
    assert "| `predict (predictor.py)` | 80.0 % | 80.0 % |" in md


def test_settings_must_be_satml_keys() -> None:
    assert serve_profile.parse_args(["--env", "SATML_WORKERS=2"]).env == ["SATML_WORKERS=2"]
    with pytest.raises(SystemExit):
        serve_profile.parse_args(["--env", "WORKERS=2"])


def test_the_sampled_process_is_a_uvicorn_worker_not_its_resource_tracker() -> None:
    tracker = b"/venv/bin/python3\0-B\0-c\0from multiprocessing.resource_tracker import main;main(6)\0"
    worker = (b"/venv/bin/python3\0-B\0-c\0from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=7, "
              b"pipe_handle=9)\0--multiprocessing-fork\0")
    assert serve_profile.is_worker_cmdline(worker) and not serve_profile.is_worker_cmdline(tracker)
