"""Reliability under load (issue 13): soak at saturation, /attack flood, SIGTERM during load.

Each part starts `satml-serve` (a subprocess on 127.0.0.1, default settings) over the shipped artifacts and
drives it with a small open-loop HTTP/1.1 client of its own (raw asyncio streams over keep-alive
connections, a few tens of microseconds of CPU per request, so the client does not take the cores it
measures): requests are sent on a fixed schedule whatever the answers, up to a bounded number of
connections; an arrival that finds every connection busy at the bound is counted as not sent.

    python benchmarks/soak_bench.py soak --minutes 10 --rate 1500      # open loop above capacity
    python benchmarks/soak_bench.py flood --seconds 20                  # /classify p99 alone vs beside /attack
    python benchmarks/soak_bench.py sigterm --rate 200                  # SIGTERM in the middle of a load

Loopback only, bounded in time and connections; results to benchmarks/results/soak_<part>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # a sibling script
    BOUNDARY,
    ROOT,
    free_port,
    multipart_body,
    sample_images,
    wait_ready,
    write_result,
)

RESULTS = ROOT / "benchmarks" / "results"
CLIENT_DEADLINE_S = 35.0  # the server's request_timeout_s (30 s) plus margin: no answer by then is a timeout
# uvicorn's keep-alive timeout (app/serve.py keeps its default): the server closes a connection idle this long
SERVER_KEEP_ALIVE_S = float(inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"].default)
# a pooled connection idle longer than this is dropped, not reused, as httpcore's keepalive_expiry does: a request
# written into a connection the server is closing at that moment fails on the client's side of the race
KEEP_ALIVE_EXPIRY_S = SERVER_KEEP_ALIVE_S - 1.0


def request_bytes(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
        f"\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Status code of one HTTP/1.1 response; its body is read and dropped (Content-Length framing)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before a response")
    status = int(status_line.split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and "close" in value.lower():
            close = True
    await reader.readexactly(length)
    if close:
        raise _Closed(status)
    return status


class _Closed(Exception):
    """The server answered and asked to close the connection (the answer counts)."""

    def __init__(self, status: int) -> None:
        self.status = status


def percentiles(values: list[float]) -> dict[str, float | None]:
    v = sorted(values)

    def q(p: float) -> float | None:
        return round(v[min(len(v) - 1, int(p * len(v)))], 1) if v else None

    return {"p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0)}


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_ms: dict[int, list[float]] = field(default_factory=dict)  # per status code
    not_sent: int = 0
    # how long each connection that failed mid-request had sat idle in the pool (None: a fresh one); a reused
    # connection failing after more than the server's keep-alive timeout is the client's stale keep-alive race,
    # not a server fault
    error_idle_s: list[float | None] = field(default_factory=list)
    expired: int = 0  # pooled connections dropped unused: idle past KEEP_ALIVE_EXPIRY_S, or closed by the server

    def summary(self) -> dict[str, Any]:
        every = [x for lat in self.latencies_ms.values() for x in lat]
        reused = sorted(a for a in self.error_idle_s if a is not None)
        return {
            "statuses": dict(self.statuses),
            "answered": len(every),
            "not_sent_at_connection_bound": self.not_sent,
            **percentiles(every),
            "connection_errors": {
                "fresh": sum(a is None for a in self.error_idle_s),
                "reused": len(reused),
                "reused_idle_over_keep_alive": sum(a > SERVER_KEEP_ALIVE_S for a in reused),
                "reused_idle_s_p50": round(reused[len(reused) // 2], 2) if reused else None,
            },
            "pooled_connections_expired": self.expired,
            "by_status": {str(k): percentiles(v) for k, v in sorted(self.latencies_ms.items())},
        }


class OpenLoop:
    """Sends `payload` to 127.0.0.1:port on a fixed schedule over at most `max_connections` connections."""

    def __init__(self, port: int, payload: bytes, max_connections: int) -> None:
        self.port, self.payload, self.max_connections = port, payload, max_connections
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # + when last used
        self.open = 0
        self.tally = Tally()
        self.tasks: set[asyncio.Task[None]] = set()

    async def one(self) -> None:
        t0 = time.perf_counter()
        idle_s: float | None = None
        # the pool is kept in order of last use (pushed and popped at the end), so the expired ones lead it
        while self.idle and (t0 - self.idle[0][2] >= KEEP_ALIVE_EXPIRY_S or self.idle[-1][0].at_eof()):
            _, stale, _ = self.idle.pop(0 if t0 - self.idle[0][2] >= KEEP_ALIVE_EXPIRY_S else -1)
            self.tally.expired += 1
            self.open -= 1
            stale.close()
        if self.idle:
            reader, writer, last_used = self.idle.pop()
            idle_s = t0 - last_used
        if idle_s is None:
            if self.open >= self.max_connections:
                self.tally.not_sent += 1
                return
            self.open += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.open -= 1
                self.tally.statuses["connect_error"] += 1
                return
        keep = False
        try:
            writer.write(self.payload)
            status = await asyncio.wait_for(read_response(reader), CLIENT_DEADLINE_S)
            keep = True
        except _Closed as c:
            status = c.status
        except TimeoutError:
            self.tally.statuses["client_timeout"] += 1
            status = 0
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.tally.statuses["connection_error"] += 1
            self.tally.error_idle_s.append(idle_s)
            status = 0
        if status:
            self.tally.statuses[str(status)] += 1
            self.tally.latencies_ms.setdefault(status, []).append(1000 * (time.perf_counter() - t0))
        if keep:
            self.idle.append((reader, writer, time.perf_counter()))
        else:
            self.open -= 1
            writer.close()

    async def run(self, rate: float, seconds: float, stop: asyncio.Event | None = None) -> None:
        t0 = time.perf_counter()
        sent = 0
        while (now := time.perf_counter() - t0) < seconds and not (stop and stop.is_set()):
            due = int(now * rate) + 1
            for _ in range(due - sent):
                task = asyncio.create_task(self.one())
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            sent = due
            await asyncio.sleep(0.002)

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for _, w, _ in self.idle:
            w.close()


@contextlib.contextmanager
def server(env: dict[str, str] | None = None, log_name: str = "server") -> Any:
    port = free_port()
    log_path = RESULTS / f".{log_name}.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    base["SATML_WORKERS"] = "1"  # one process: the memory and descriptors sampled are the server's own
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.serve", "--port", str(port), "--log-level", "warning"],
            env={**base, **(env or {})},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}/health/ready", 180, proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log_path.unlink(missing_ok=True)


def proc_sample(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a process."""
    rss = next(
        int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS:")
    )
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def ready_probe(port: int) -> tuple[int, float]:
    import urllib.error
    import urllib.request

    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=10) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    return status, 1000 * (time.perf_counter() - t0)


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def classify_body(n_images: int = 1) -> bytes:
    images = sample_images()
    return multipart_body([images[i % len(images)] for i in range(n_images)])


def soak(args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.minutes * 60
    samples: list[dict[str, Any]] = []
    with server(log_name="soak") as (proc, port):
        stop_sampling = threading.Event()

        def sampler() -> None:
            t0 = time.perf_counter()
            while not stop_sampling.wait(1.0):
                rss, fds = proc_sample(proc.pid)
                status, ms = ready_probe(port)
                samples.append(
                    {
                        "t": round(time.perf_counter() - t0, 1),
                        "rss_kib": rss,
                        "fds": fds,
                        "ready": status,
                        "ready_ms": round(ms, 1),
                    }
                )

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        loop = OpenLoop(port, request_bytes("/classify", classify_body()), args.max_connections)

        async def go() -> None:
            await loop.run(args.rate, seconds)
            await loop.drain()

        asyncio.run(go())
        stop_sampling.set()
        thread.join()
        alive = proc.poll() is None
    minute = [s for s in samples if s["t"] <= 60] or samples[:1]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - 60] or samples[-1:]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return float(sum(r[key] for r in rows)) / len(rows)

    summary = loop.tally.summary()
    bad = {k: v for k, v in summary["statuses"].items() if k not in ("200", "429", "503")}
    return {
        "part": "soak",
        "rate_per_s": args.rate,
        "seconds": seconds,
        "max_connections": args.max_connections,
        **summary,
        "unacceptable": bad,
        "server_alive_after": alive,
        "rss_mib_first_minute": round(mean(minute, "rss_kib") / 1024, 1),
        "rss_mib_last_minute": round(mean(last, "rss_kib") / 1024, 1),
        "rss_growth_pct": round(100 * (mean(last, "rss_kib") / mean(minute, "rss_kib") - 1), 2),
        "fds_first_minute": round(mean(minute, "fds"), 1),
        "fds_last_minute": round(mean(last, "fds"), 1),
        "ready_not_200": sum(s["ready"] != 200 for s in samples),
        "ready_max_ms": max(s["ready_ms"] for s in samples),
        "samples": samples,
    }


def flood(args: argparse.Namespace) -> dict[str, Any]:
    images = sample_images()
    attack = multipart_body(images[:1], field="file", extra={"steps": "10", "compare": "supervised"})
    with server(log_name="flood") as (_, port):

        async def phase(with_attacks: bool) -> dict[str, Any]:
            classify = OpenLoop(port, request_bytes("/classify", classify_body()), 64)
            attacks = OpenLoop(port, request_bytes("/attack", attack), args.attack_clients)
            jobs = [classify.run(args.classify_rate, args.seconds)]
            if with_attacks:
                jobs.append(attacks.run(args.attack_rate, args.seconds))
            await asyncio.gather(*jobs)
            await classify.drain()
            await attacks.drain()
            return {"classify": classify.tally.summary(), "attack": attacks.tally.summary() if with_attacks else None}

        alone = asyncio.run(phase(False))
        flooded = asyncio.run(phase(True))
    ratio = (flooded["classify"]["p99_ms"] or 0) / max(1e-9, alone["classify"]["p99_ms"] or 0)
    return {
        "part": "flood",
        "classify_rate_per_s": args.classify_rate,
        "attack_rate_per_s": args.attack_rate,
        "attack_clients": args.attack_clients,
        "seconds": args.seconds,
        "alone": alone,
        "flooded": flooded,
        "p99_ratio": round(ratio, 2),
        "target_p99_ratio": 2.0,
    }


def sigterm(args: argparse.Namespace) -> dict[str, Any]:
    with server(log_name="sigterm") as (proc, port):
        loop = OpenLoop(port, request_bytes("/classify", classify_body(args.images)), args.max_connections)
        exit_s: list[float] = []

        async def go() -> None:
            run = asyncio.create_task(loop.run(args.rate, args.before_s + args.after_s))
            await asyncio.sleep(args.before_s)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None and time.perf_counter() - t0 < 60:
                await asyncio.sleep(0.01)
            exit_s.append(time.perf_counter() - t0)
            await run
            await loop.drain()

        asyncio.run(go())
        code = proc.returncode
    summary = loop.tally.summary()
    bad = {
        k: v
        for k, v in summary["statuses"].items()
        if k not in ("200", "429", "503", "connect_error", "connection_error")
    }
    return {
        "part": "sigterm",
        "rate_per_s": args.rate,
        "images_per_request": args.images,
        "sigterm_after_s": args.before_s,
        **summary,
        "unacceptable": bad,
        "exit_after_sigterm_s": round(exit_s[0], 2),
        "exit_code": code,
        "grace_s": 15.0,
    }


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    head = (
        f"{m['cores']} cores, load average {m['loadavg_at_start']} at the start, {r['loadavg_at_end']} at "
        f"the end; satml-serve default settings over `artifacts/`, loopback. Command: `{r['command']}`"
    )
    keep = {k: v for k, v in r.items() if k not in ("samples", "machine", "command", "loadavg_at_end")}
    return f"# {r['part']} (`benchmarks/soak_bench.py`)\n\n{head}\n\n```json\n{json.dumps(keep, indent=2)}\n```\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("soak")
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--rate", type=float, default=1500.0, help="requests/s sent (above capacity)")
    s.add_argument("--max-connections", type=int, default=512)
    f = sub.add_parser("flood")
    f.add_argument("--seconds", type=float, default=20.0)
    f.add_argument("--classify-rate", type=float, default=100.0, help="1-image /classify requests/s")
    f.add_argument("--attack-rate", type=float, default=20.0, help="/attack requests/s (PGD-10 + compare)")
    f.add_argument("--attack-clients", type=int, default=32, help="connections the attack flood may use")
    t = sub.add_parser("sigterm")
    t.add_argument("--rate", type=float, default=200.0)
    t.add_argument("--images", type=int, default=8)
    t.add_argument("--before-s", type=float, default=5.0)
    t.add_argument("--after-s", type=float, default=3.0)
    t.add_argument("--max-connections", type=int, default=256)
    for sp in (s, f, t):
        sp.add_argument("--out", help="result path without suffix (default benchmarks/results/soak_<part>)")
    args = p.parse_args(argv)
    start = machine()
    result = {"soak": soak, "flood": flood, "sigterm": sigterm}[args.part](args)
    result.update(
        machine=start,
        loadavg_at_end=[round(x, 2) for x in os.getloadavg()],
        command="python benchmarks/soak_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    out = Path(args.out or RESULTS / f"soak_{args.part}")
    write_result(out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
