"""benchmarks/serve_bench.py's arithmetic: throughput counts answered requests only, and a point where the server
shed load is reported not valid and never meets a target (an 8 x 64 point once read 98 % of the bound while 1,606
requests were answered 503)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("serve_bench")


def _wrk(requests: int, status_errors: int = 0, seconds: float = 10.0) -> dict[str, Any]:
    return {"requests": requests, "duration_us": int(seconds * 1e6), "bytes": 0,
            "errors": {"connect": 0, "read": 0, "write": 0, "status": status_errors, "timeout": 0},
            "latency_us": {"mean": 2000.0, "stdev": 10.0, "min": 900, "max": 9000, "p50": 1800, "p90": 2500,
                           "p99": 4000}}


def test_wrk_summary_counts_answered_requests_only(bench: ModuleType) -> None:
    ok = bench.wrk_summary(_wrk(5000))
    assert ok["rps"] == 500.0 and ok["errors"] == 0 and ok["p50_ms"] == 1.8 and ok["p99_ms"] == 4.0
    shed = bench.wrk_summary(_wrk(5000, status_errors=1600))
    assert shed["answered"] == 3400 and shed["rps"] == 340.0 and shed["errors"] == 1600


def _point(ipr: int, conns: int, rps: float, errors: int = 0) -> dict[str, Any]:
    return {"images_per_request": ipr, "connections": conns, "rps": rps, "images_per_s": rps * ipr,
            "errors": errors, "p50_ms": 5.0, "p99_ms": 20.0, "server_cores": 1.5, "wrk_cores": 0.02}


RAW = {"per_batch": {"1": {"ms_per_batch": 1.0, "images_per_s": 1000.0, "median_ms_per_pass": [1.1]},
                     "32": {"ms_per_batch": 8.0, "images_per_s": 4000.0, "median_ms_per_pass": [8.5]}},
       "arch": "cnn8", "width": 16, "bank_size": 100, "k": 5, "index": "torch", "device": "cpu", "runtime": "torch"}
CEILING = {"1x32": _point(1, 32, 6000), "8x32": _point(8, 32, 3000)}
CLASSIFY = {"1x32": _point(1, 32, 1900), "8x32": _point(8, 32, 390, errors=1600)}


def _result(bench: ModuleType, attack: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole benchmark result of RAW, CEILING and CLASSIFY, as `markdown` reads it."""
    return {"machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "platform": "p", "torch": "t", "torch_threads": 2,
                        "cuda": False, "wrk": "wrk", "loadavg_at_start": [0.1, 0.2, 0.3]},
            "raw": RAW, "summary": bench.summarise(RAW, CEILING, CLASSIFY, max_batch=64), "started": "now",
            "artifact": "a", "classify": CLASSIFY, "ceiling": CEILING,
            "config": {"quick": True, "duration_s": 1.0, "env": {}}, "server": {"max_batch": 64, "max_wait_ms": 0},
            "attack": attack}


def test_a_shedding_point_is_not_valid_and_misses_its_target(bench: ModuleType) -> None:
    s = bench.summarise(RAW, CEILING, CLASSIFY, max_batch=64)
    # bound for 1 image: 1 / (1/4000 + 1/6000) = 2400 img/s; 1900 is 79 %
    assert s["ratios"]["1x32"]["bound_images_per_s"] == pytest.approx(2400, abs=0.1)
    assert s["ratios"]["1x32"]["valid"] and not s["ratios"]["8x32"]["valid"]
    assert s["ratios"]["8x32"]["ratio"] > 0.8  # above the target in numbers, and still not met: it shed load
    assert not s["checks"]["throughput_8x32"]["ok"] and not s["checks"]["throughput_1x32"]["ok"]
    md = bench.markdown(_result(bench, []))
    row_8x32 = next(line for line in md.splitlines() if line.startswith("| 8 | 32 |"))
    assert "not valid" in row_8x32 and "not valid" not in md.split("| 1 | 32 |")[1].splitlines()[0]
    assert "answered requests only" in md


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "fused"])
def test_the_raw_reference_times_each_runtime_of_the_app(bench: ModuleType, runtime: str,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """The raw reference is the best in-process path, so each of the server's CPU paths is timed (the fused one,
    the vote inside the onnxruntime graph, included) on a real artifact folder."""
    from tests.app.toy import export_toy

    folder = tmp_path_factory.mktemp("raw") / "default"
    export_toy(folder, seed=0, name="default")
    raw = bench.RawBench(folder, runtime)
    times = bench.raw_pass(raw, (1, 4), 0.01)
    assert set(times) == {1, 4} and all(len(t) >= 3 and min(t) > 0 for t in times.values())
    assert raw.info["runtime"] == runtime


def test_attack_latency_waits_out_shedding_and_times_answered_requests_only(bench: ModuleType) -> None:
    """Right after an overload point the queue may still be full: 503s answered in milliseconds once read as a
    PGD-10 p50 of 8 ms. The warm-up is retried until answered, and a refusal among the timed requests is counted
    but not timed."""
    answers = iter([(503, {}, 2.0)] * 3 + [(200, {"latency_ms": 150}, 160.0)]  # warm-up: shed three times
                   + [(200, {"latency_ms": 150}, 150.0 + i) for i in range(4)] + [(503, {}, 1.0)])
    sent: list[str] = []

    def post(url: str, body: bytes) -> tuple[int, dict[str, Any], float]:
        sent.append(url)
        return next(answers)

    a = bench.attack_latency("http://127.0.0.1:1", b"png", "default", 5, post=post, retry_s=0.0)
    assert len(sent) == 4 + 5 and a["n"] == 5 and a["ok"] == 4
    assert a["p50_ms"] == 152.0 and a["p99_ms"] == 153.0  # ranks round(q * 3) of the answered 150..153 ms
    assert a["server_latency_ms_mean"] == 150.0
    assert a["mean_ms"] == 151.5
    shed = bench.attack_latency("http://127.0.0.1:1", b"png", "default", 2, post=lambda u, b: (503, {}, 1.0),
                                settle_s=0.0, retry_s=0.0)
    assert shed["ok"] == 0 and shed["p50_ms"] is None and shed["mean_ms"] is None
    md = bench.markdown(_result(bench, [a, shed]))
    assert "| 5 (4) | 152 | 153 | 150.0 |" in md
    assert "| 2 (0) | - | - | None |" in md


PROC_NET_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:D432 06 00000000:00000000 03:00000F9B 00000000     0        0 0 3 0 0 0 0 0
   4: 0100007F:1F91 0100007F:D433 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0 20 4 30 10 -1
"""


def test_port_inodes_are_the_servers_side_of_its_port(bench: ModuleType) -> None:
    """Port 8080 (0x1F90): the client's end (local port 0xD431), a TIME_WAIT (06) and another port's connection are
    not the server's established connections; the listening socket is found by its own state."""
    assert bench.port_inodes(PROC_NET_TCP, 8080, bench.ESTABLISHED) == {1002}
    assert bench.port_inodes(PROC_NET_TCP, 8080, bench.LISTEN) == {1001}
    assert bench.port_inodes(PROC_NET_TCP, 8081, bench.ESTABLISHED) == {1004}
    assert bench.port_inodes(PROC_NET_TCP, 9999, bench.ESTABLISHED) == set()


# a listening parent that forks two children in turn: the first accepts three connections, the second one; a
# third child holds no socket of the port (as multiprocessing's resource tracker beside uvicorn's workers)
SPLIT_SERVER = r"""
import os, socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
if os.fork() == 0:
    s.close(); time.sleep(60); os._exit(0)
for n in (3, 1):
    r, w = os.pipe()
    if os.fork() == 0:
        held = [s.accept()[0] for _ in range(n)]
        os.write(w, b"x"); print(f"accepted {n}", flush=True); time.sleep(60); os._exit(0)
    os.read(r, 1)
time.sleep(60)
"""


def test_connection_split_counts_each_worker_process_connections(bench: ModuleType) -> None:
    """Real sockets on loopback: a server whose two worker processes hold 3 and 1 of its 4 connections reads [3, 1]
    (what serve_bench prints for SATML_WORKERS=2, where the OS decides the split)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    clients: list[socket.socket] = []
    with subprocess.Popen([sys.executable, "-c", SPLIT_SERVER], stdout=subprocess.PIPE, text=True,
                          start_new_session=True) as server:
        assert server.stdout is not None
        try:
            port = int(server.stdout.readline())
            clients += [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            assert server.stdout.readline().strip() == "accepted 3"
            clients.append(socket.create_connection(("127.0.0.1", port)))
            assert server.stdout.readline().strip() == "accepted 1"
            assert bench.connection_split(server.pid, port) == [3, 1]
            assert bench.connection_split(server.pid, port + 1 if port < 65535 else port - 1) == [0]  # no worker
        finally:
            os.killpg(server.pid, signal.SIGKILL)  # the parent and both forked children
            for c in clients:
                c.close()
