"""`satml-ray-serve`: its options, and the real thing, a local single-node Ray cluster with 2 replicas on
127.0.0.1: answers equal the plain app's, a replica killed mid-load loses only requests in flight (a retry
succeeds) and is replaced, SIGTERM takes the whole cluster down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.ray_serve import PROC_TITLE, deployment_options, parse_args, replica_env
from tests.app.conftest import make_settings
from tests.app.servers import free_port, stop, wait_ready
from tests.app.toy import png, toy_images

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make install-dev installs it)")

START_TIMEOUT_S = 240  # Ray's head, Serve's controller and proxy, then two replicas importing torch, on 2 cores
REQUEST_TIMEOUT_S = 30


def test_options_fixed_replicas_and_resources() -> None:
    args = parse_args(["--replicas", "3", "--cpus-per-replica", "2", "--default-model", "other"])
    env = replica_env(args, {"SATML_DEFAULT_MODEL": "default", "SATML_API_KEY": "k", "HOME": "/root"})
    assert env["SATML_DEFAULT_MODEL"] == "other"  # a flag wins over the environment
    assert env["SATML_API_KEY"] == "k" and "HOME" not in env  # SATML_* travel, nothing else does
    assert env["SATML_COMPUTE_THREADS"] == "2"  # threads follow the CPUs Ray reserves
    options = deployment_options(args, Settings(max_concurrent_requests=40), env)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"]["num_cpus"] == 2 and options["max_ongoing_requests"] == 40
    assert options["ray_actor_options"]["runtime_env"]["env_vars"] is env


def test_options_autoscaling_and_own_thread_setting() -> None:
    args = parse_args(["--min-replicas", "1", "--max-replicas", "4", "--target-ongoing-requests", "8"])
    env = replica_env(args, {"SATML_COMPUTE_THREADS": "3"})
    assert env["SATML_COMPUTE_THREADS"] == "3"
    options = deployment_options(args, Settings(), env)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}


@pytest.mark.parametrize("argv", [["--min-replicas", "1"], ["--min-replicas", "3", "--max-replicas", "2"],
                                  ["--replicas", "0"], ["--cpus-per-replica", "0"]])
def test_bad_options_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def _replica_pids() -> set[int]:
    """Replica processes on this machine: Ray titles them ray::ServeReplica:<app>:<deployment>[.method]."""
    out = subprocess.run(["pgrep", "-f", f"ray::{PROC_TITLE}"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture(scope="module")
def ray_server(good_root: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SATML_", "RAY_"))}
    env["SATML_MAX_WAIT_MS"] = "2"  # as make_settings: the same batching as the in-process reference
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.ray_serve", "--replicas", "2", "--port", str(port),
                                 "--artifacts-dir", str(good_root), "--log-level", "warning"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda: proc.poll() is None, f"{url}/health/ready", timeout_s=START_TIMEOUT_S, poll_s=1)
        deadline = time.monotonic() + START_TIMEOUT_S  # ready answers once one replica is up; wait for both
        while len(_replica_pids()) < 2:
            assert time.monotonic() < deadline, "the second replica did not start"
            time.sleep(1)
        yield url, proc
    finally:
        stop(proc, timeout_s=60)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        print(log_path.read_text(errors="replace")[-4000:])


def test_ray_replicas_answer_as_the_plain_app(ray_server: tuple[str, subprocess.Popen[bytes]],
                                              good_root: Path) -> None:
    url, _ = ray_server
    images, labels = toy_images(6, seed=77)
    files = [("files", (f"{i}.png", png(x), "image/png")) for i, x in enumerate(images)]
    with TestClient(create_app(make_settings(good_root))) as plain:
        want = plain.post("/classify", files=files).json()
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as c:
        for _ in range(4):  # several requests, so both replicas answer some
            got = c.post("/classify", files=files)
            assert got.status_code == 200
            assert got.json()["results"] == want["results"]
        assert [r["class_id"] for r in want["results"]] == labels.tolist()
        meta = c.get("/v2/models/default").json()
        assert meta["name"] == "default" and meta["inputs"]


def test_killed_replica_loses_only_in_flight_requests_and_is_replaced(
        ray_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = ray_server
    images, _ = toy_images(1, seed=5)
    body = png(images[0])
    before = _replica_pids()
    assert len(before) == 2
    results: list[tuple[int, int]] = []  # (first attempt's status or -1 for a transport error, final status)
    stop_load = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as c:
            while not stop_load.is_set():
                statuses = []
                for _attempt in range(3):  # a client retries what failed, as clients of any replica set do
                    try:
                        statuses.append(c.post("/classify", files={"file": ("x.png", body, "image/png")}).status_code)
                    except httpx.TransportError:
                        statuses.append(-1)
                    if statuses[-1] == 200:
                        break
                    time.sleep(0.5)
                results.append((statuses[0], statuses[-1]))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    time.sleep(8)
    stop_load.set()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * 3)
    assert len(results) > 20, "the load did not run"
    assert all(final == 200 for _, final in results), f"a retried request still failed: {results}"
    first_failures = sum(first != 200 for first, _ in results)
    # what was in flight on the killed replica, plus requests the proxy routed to it before noticing the death
    assert first_failures <= 4 * 3, f"{first_failures} first attempts failed of {len(results)}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # Serve's controller starts a new replica in place of the dead one
        now = _replica_pids()
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {now}"
        time.sleep(1)
    print(f"killed replica {victim}: {len(results)} requests, {first_failures} first attempts failed, all retries "
          f"answered 200; replaced by {now - before}")
    assert httpx.get(f"{url}/health/ready", timeout=REQUEST_TIMEOUT_S).status_code == 200


def test_sigterm_takes_the_local_cluster_down(ray_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    _, proc = ray_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    deadline = time.monotonic() + 60
    while _replica_pids():
        assert time.monotonic() < deadline, "replica processes outlived satml-ray-serve"
        time.sleep(1)
