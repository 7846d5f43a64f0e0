"""Serving benchmark: does HTTP /classify approach the raw batched forward pass? (DESIGN section 5)

Measured in one run on loopback, with `wrk` (C, event-driven, one thread) as the load generator so
the client does not share the Python interpreter with the server:

1. raw     in-process batched forward + k-NN of the model, through the app's own engine pieces
           (`app.runtimes.TorchEmbed` + `app.index.build_index`), per batch size
2. ceiling a hello-world FastAPI endpoint that only reads the multipart upload, served by uvicorn
           exactly as `satml-serve` serves the app, under the same load as (3)
3. classify `POST /classify` on the real server (`satml-serve` subprocess) with 1 and with 8 images per
           request at 1/8/32/64 concurrent connections: requests/s, images/s, p50/p99 latency
4. attack  `POST /attack` PGD-10 at eps 8/255, sequential requests: latency p50/p99

The bound (issue 17): on a CPU the server and the model share the cores, so for N images per request
/classify can reach at most 1 / (1/raw + 1/(N * ceiling)) images/s, raw = the best in-process images/s
over the batch sizes, ceiling = the hello-world requests/s for the same N-image request and connection
count; on a GPU (--gpu) the model runs elsewhere and the bound is min(raw, N * ceiling).
Targets: /classify at 32 connections >= 80 % of the bound (1 and 8 images per request); p50 at 1
connection, 1 image <= raw batch-1 time + 1.5 ms; p99 at 32 connections, 1 image <= 3 x the in-process
time of one batch of 32. Each load point also records the CPU the server and wrk used (cores).
Results (with the machine description) go to
benchmarks/results/serve_bench.{json,md}; --quick writes test-output/serve_bench_quick.* instead.

    python benchmarks/serve_bench.py --artifacts artifacts          # the real models
    python benchmarks/serve_bench.py --synthetic --quick            # random weights, same shapes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, UploadFile

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "app" / "static" / "samples"
LUA = ROOT / "benchmarks" / "wrk" / "multipart.lua"
BOUNDARY = "----satml-serve-bench-7d1f"
TARGET_RATIO = 0.80  # /classify throughput / the bound, at 32 connections
TARGET_P99_FACTOR = 3.0  # p99 at 32 clients / in-process time of one batch of 32
TARGET_P50_SLACK_MS = 1.5  # p50 at 1 client, 1 image - raw batch-1 time

log = logging.getLogger("serve_bench")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Durations in seconds; concurrency = open wrk connections."""

    artifacts: Path
    model: str
    out_prefix: Path
    duration_s: float
    warmup_s: float
    raw_min_s: float  # measuring time per batch size in-process
    concurrency: tuple[int, ...]
    images_per_request: tuple[int, ...]
    raw_batches: tuple[int, ...]
    attack_n: int
    quick: bool
    synthetic: bool
    gpu: bool = False


# --- machine and inputs --------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    mem_gib = None
    with contextlib.suppress(OSError, AttributeError, ValueError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(), "wrk": wrk[0] if wrk else "unknown",
        "loadavg_at_start": list(os.getloadavg()),
        "other_load": "a model-training job may share the CPU; see loadavg",
    }


def sample_images() -> list[bytes]:
    """The demo page's CIFAR-10 sample PNGs (32x32, real test images)."""
    index = json.loads((SAMPLES / "index.json").read_text())
    return [(SAMPLES / s["file"]).read_bytes() for s in index["samples"]]


def multipart_body(images: list[bytes], field: str = "files", extra: dict[str, str] | None = None) -> bytes:
    """A multipart/form-data body (boundary BOUNDARY) with one part per image and optional form fields."""
    parts = []
    for name, value in (extra or {}).items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for i, data in enumerate(images):
        head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="img{i}.png"\r\n'
                "Content-Type: image/png\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def make_synthetic_artifacts(folder: Path, width: int, bank_size: int) -> Path:
    """Random-weight artifacts `default` and `supervised` with the real shapes (for timing only)."""
    import torch

    from training.export import export_artifact
    from training.models import Encoder, EncoderConfig

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, (name, method) in enumerate([("default", "sat"), ("supervised", "supervised")]):
        torch.manual_seed(i)
        encoder = Encoder(EncoderConfig(arch="resnet10", width=width))
        bank = torch.nn.functional.normalize(torch.randn(bank_size, encoder.cfg.embed_dim), dim=1)
        labels = torch.arange(bank_size) % len(classes)
        export_artifact(folder / name, encoder, bank, labels, name=name, classes=classes, dataset="synthetic",
                        training={"method": method, "hyperparameters": {}, "epochs": 0, "seed": i,
                                  "code_version": "benchmark"},
                        description=f"random weights for serve_bench ({method} stand-in)", onnx=False)
    return folder


# --- (1) raw in-process throughput ------------------------------------------------------------------------


class RawBench:
    """The app's predict path (embed + k-NN + vote) in-process: `app.runtimes.TorchEmbed` (or `OnnxEmbed`) +
    `app.index.build_index`, or (`fused`) `app.fused.FusedOnnx`, the vote inside the onnxruntime graph."""

    def __init__(self, folder: Path, runtime: str = "torch") -> None:
        from app.config import Settings
        from app.index import build_index, resolve_index
        from app.runtimes import OnnxEmbed, TorchEmbed, resolve_serving_device
        from training.artifact import ENCODER_ONNX, load_artifact

        settings = Settings(artifacts_dir=folder.parent)
        device = resolve_serving_device(settings.device)
        index_kind = resolve_index(settings.index, device)
        art = load_artifact(folder, device)
        if runtime == "fused":
            from app.fused import FusedOnnx, fused_model

            self.run: Callable[[Any], object] = FusedOnnx(fused_model(folder, art))
        else:
            embed = (OnnxEmbed(folder / ENCODER_ONNX, device) if runtime == "onnxruntime"
                     else TorchEmbed(art.encoder, device))
            index = build_index(index_kind, art)
            self.run = lambda x: index(embed(x))
        self.size = art.input_size
        self.info = {"device": str(device), "runtime": runtime, "index": index_kind,
                     "bank_size": int(art.bank.shape[0]), "k": art.k, "arch": art.manifest["encoder"]["arch"],
                     "width": art.manifest["encoder"]["width"]}

    def times(self, batch: int, min_s: float) -> list[float]:
        """Seconds per call of one batch, repeated for at least min_s (and 3 times), after a warm-up."""
        import torch

        x = torch.rand(batch, 3, self.size, self.size, generator=torch.Generator().manual_seed(batch))
        self.run(x)
        out: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < min_s or len(out) < 3:
            t0 = time.perf_counter()
            self.run(x)
            out.append(time.perf_counter() - t0)
        return out


def raw_summary(info: dict[str, Any], passes: list[dict[int, list[float]]]) -> dict[str, Any]:
    """Per batch size: the best (minimum) time over all passes is the reference, medians are reported.

    Two passes (before and after the HTTP runs) and the minimum, so a noisy machine cannot make the
    raw reference look slow and the /classify ratio look better than it is.
    """
    per_batch = {}
    for b in passes[0]:
        best = 1000 * min(min(p[b]) for p in passes)
        per_batch[str(b)] = {"ms_per_batch": round(best, 3), "images_per_s": round(1000 * b / best, 1),
                             "median_ms_per_pass": [round(1000 * statistics.median(p[b]), 3) for p in passes],
                             "repeats": sum(len(p[b]) for p in passes)}
    return {**info, "per_batch": per_batch, "passes": len(passes)}


def raw_pass(bench: RawBench, batches: tuple[int, ...], min_s: float) -> dict[int, list[float]]:
    out = {}
    for b in batches:
        out[b] = bench.times(b, min_s)
        med = statistics.median(out[b])
        log.info("raw batch %d: median %.2f ms (%.0f images/s), best %.2f ms", b, 1000 * med, b / med,
                 1000 * min(out[b]))
    return out


# --- servers and load ------------------------------------------------------------------------------------


def ceiling_app() -> FastAPI:
    """The framework ceiling: FastAPI reading the same multipart upload, doing nothing with it."""
    app = FastAPI()

    @app.post("/classify")
    async def upload(files: list[UploadFile] = File(...)) -> dict[str, int]:  # noqa: B008 - FastAPI idiom
        total = 0
        for f in files:
            total += len(await f.read())
        return {"files": len(files), "bytes": total}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str], ready_url: str, log_path: Path) -> Iterator[int]:
    """Run a server subprocess until the block ends; its output goes to log_path."""
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_ready(ready_url, 180, proc)
            yield proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds so far of a process, its threads and its live child processes (uvicorn's
    workers with SATML_WORKERS > 1), from Linux /proc; None elsewhere."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    total = (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(process_cpu_s(int(c)) or 0.0 for c in children)


ESTABLISHED, LISTEN = "01", "0A"


def port_inodes(proc_net_tcp: str, port: int, state: str) -> set[int]:
    """Socket inodes in `state` (ESTABLISHED: the server's side of its connections; LISTEN) whose local port is
    `port`, from the text of Linux's /proc/net/tcp or tcp6 (hex ports and states; the inode is the tenth column)."""
    found = set()
    for line in proc_net_tcp.splitlines()[1:]:
        cols = line.split()
        if len(cols) > 9 and cols[3] == state and int(cols[1].rsplit(":", 1)[1], 16) == port:
            found.add(int(cols[9]))
    return found


def connection_split(server_pid: int, port: int) -> list[int] | None:
    """How many of the server's established connections on `port` each of its processes holds, largest first: one
    entry per uvicorn worker (a child holding a listening socket on the port; SATML_WORKERS > 1) or the server
    itself. None where /proc cannot tell (not Linux, or a process ended meanwhile)."""
    try:
        tables = [Path(f"/proc/net/{f}").read_text() for f in ("tcp", "tcp6")]
        established = set().union(*(port_inodes(t, port, ESTABLISHED) for t in tables))
        listening = set().union(*(port_inodes(t, port, LISTEN) for t in tables))
        children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
        counts = {}
        for pid in [int(c) for c in children] + [server_pid]:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            inodes = {int(ln[8:-1]) for ln in links if ln.startswith("socket:[")}
            counts[pid] = (bool(inodes & listening), len(inodes & established))
    except (OSError, ValueError):
        return None
    workers = [n for pid, (listens, n) in counts.items() if listens and pid != server_pid]
    return sorted(workers or [counts[server_pid][1]], reverse=True)


def children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_wrk(url: str, body_file: Path, connections: int, duration_s: float,
            server_pid: int | None = None) -> dict[str, Any]:
    """One closed-loop wrk run; returns requests/s, latency percentiles (ms), the cores the server and wrk used
    meanwhile (CPU seconds / wall seconds) and, sampled halfway, how the connections split over the server's
    processes (with several, the busiest process's share sets the tail latency)."""
    wrk_s = max(1, round(duration_s))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{wrk_s}s", "--timeout", "30s",
           "-s", str(LUA), url, "--", str(body_file), BOUNDARY]
    srv0, wrk0, t0 = process_cpu_s(server_pid) if server_pid else None, children_cpu_s(), time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        split = None
        if server_pid:
            time.sleep(wrk_s / 2)
            split = connection_split(server_pid, urllib.parse.urlsplit(url).port or 80)
        stdout, stderr = proc.communicate(timeout=duration_s + 60)
    wall = time.perf_counter() - t0
    srv1 = process_cpu_s(server_pid) if server_pid else None
    line = next((ln for ln in stdout.splitlines() if ln.startswith("SERVE_BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout[-500:]} {stderr[-500:]}")
    return {**wrk_summary(json.loads(line.removeprefix("SERVE_BENCH_JSON "))),
            "server_cores": round((srv1 - srv0) / wall, 2) if srv0 is not None and srv1 is not None else None,
            "wrk_cores": round((children_cpu_s() - wrk0) / wall, 2), "connection_split": split}


def wrk_summary(s: dict[str, Any]) -> dict[str, Any]:
    """The figures of one wrk summary (multipart.lua's JSON). `rps` counts only answered (2xx/3xx) requests: wrk's
    own count includes the 429/503 a shedding server sends back fast, which would inflate the throughput of an
    overloaded point (8 images x 64 connections once read 98 % of the bound while 1,606 requests were shed)."""
    seconds = s["duration_us"] / 1e6
    errors = sum(s["errors"].values())
    answered = s["requests"] - s["errors"]["status"]
    lat = s["latency_us"]
    return {"requests": s["requests"], "answered": answered, "rps": round(answered / seconds, 1),
            "errors": errors, "error_detail": s["errors"], "p50_ms": lat["p50"] / 1000, "p90_ms": lat["p90"] / 1000,
            "p99_ms": lat["p99"] / 1000, "mean_ms": round(lat["mean"] / 1000, 3), "max_ms": lat["max"] / 1000}


def load_matrix(url: str, bodies: dict[int, Path], cfg: BenchConfig, label: str,
                server_pid: int | None = None) -> dict[str, dict[str, Any]]:
    """wrk over every (images per request, connections) pair, after one checked request and a warm-up run."""
    for ipr, body in bodies.items():
        status, payload, _ = post_multipart(url, body.read_bytes())
        if status != 200:
            raise RuntimeError(f"{label}: a {ipr}-image request to {url} answered {status}: {payload}")
    run_wrk(url, bodies[cfg.images_per_request[0]], 8, cfg.warmup_s)
    out: dict[str, dict[str, Any]] = {}
    for ipr in cfg.images_per_request:
        for c in cfg.concurrency:
            r = run_wrk(url, bodies[ipr], c, cfg.duration_s, server_pid)
            r["images_per_s"] = round(r["rps"] * ipr, 1)
            out[f"{ipr}x{c}"] = {"images_per_request": ipr, "connections": c, **r}
            log.info("%s %d img/req x %d conns: %.0f req/s, %.0f img/s, p50 %.1f ms, p99 %.1f ms, errors %d, "
                     "server %s cores, wrk %s cores, conns per process %s", label, ipr, c, r["rps"],
                     r["images_per_s"], r["p50_ms"], r["p99_ms"], r["errors"], r["server_cores"], r["wrk_cores"],
                     r["connection_split"])
            if r["errors"]:
                log.warning("%s: %d of %d requests failed (%s); this point does not count", label, r["errors"],
                            r["requests"], r["error_detail"])
    return out


# --- (4) attack latency ----------------------------------------------------------------------------------


def post_multipart(url: str, body: bytes, timeout_s: float = 120) -> tuple[int, dict[str, Any], float]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    return status, json.loads(payload or b"{}"), 1000 * (time.perf_counter() - t0)


PostFn = Callable[[str, bytes], tuple[int, dict[str, Any], float]]
SHED = (429, 503)  # the server's "busy, retry" answers


def attack_latency(base: str, image: bytes, model: str, n: int, compare: str = "", post: PostFn = post_multipart,
                   settle_s: float = 60.0, retry_s: float = 1.0) -> dict[str, Any]:
    """p50 / p99 of n sequential PGD-10 requests, over the answered (200) ones only. The warm-up request is retried
    while the server sheds it (429/503: the overload point before this phase may still be draining its queue) for
    up to settle_s, so that refusals answered in milliseconds never pass for attack latencies."""
    fields = {"model": model, "method": "pgd", "eps": str(8 / 255), "steps": "10"}
    if compare:
        fields["compare"] = compare
    body = multipart_body([image], field="file", extra=fields)
    deadline = time.monotonic() + settle_s
    while post(f"{base}/attack", body)[0] in SHED and time.monotonic() < deadline:  # warm-up, once answered
        time.sleep(retry_s)
    client, server_ms, statuses = [], [], []
    for _ in range(n):
        status, payload, ms = post(f"{base}/attack", body)
        statuses.append(status)
        if status == 200:
            client.append(ms)
            server_ms.append(float(payload.get("latency_ms", 0)))
        else:
            log.warning("attack answered %d: %s", status, payload)
    client.sort()

    def pct(q: float) -> float | None:
        return round(client[min(len(client) - 1, round(q * (len(client) - 1)))], 1) if client else None

    return {"method": "pgd", "steps": 10, "eps": "8/255", "compare": compare or None, "n": n,
            "ok": statuses.count(200), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "mean_ms": round(statistics.mean(client), 1) if client else None,
            "server_latency_ms_mean": round(statistics.mean(server_ms), 1) if server_ms else None}


# --- report ------------------------------------------------------------------------------------------------


def bound_images_per_s(raw_best: float, ceiling_rps: float, images_per_request: int, gpu: bool) -> float:
    """The most /classify can serve: on a CPU the model and the server share the cores, so their per-image
    times add (1 / (1/raw + 1/(N * ceiling))); on a GPU they overlap (min(raw, N * ceiling))."""
    n_ceiling = images_per_request * ceiling_rps
    return min(raw_best, n_ceiling) if gpu else 1 / (1 / raw_best + 1 / n_ceiling)


def summarise(raw: dict[str, Any], ceiling: dict[str, Any], classify: dict[str, Any], max_batch: int,
              gpu: bool = False) -> dict[str, Any]:
    """Ratios of /classify to the bound, and the three targets of issue 17."""
    per_batch = raw["per_batch"]
    best_raw = max(v["images_per_s"] for v in per_batch.values())
    rows = {}
    for key, r in classify.items():
        ipr, c = r["images_per_request"], r["connections"]
        bound = bound_images_per_s(best_raw, ceiling[key]["rps"], ipr, gpu)
        rows[key] = {"images_per_request": ipr, "connections": c, "classify_images_per_s": r["images_per_s"],
                     "raw_best_images_per_s": best_raw, "ceiling_images_per_s": round(ceiling[key]["rps"] * ipr, 1),
                     "bound_images_per_s": round(bound, 1), "ratio": round(r["images_per_s"] / bound, 3),
                     "valid": r["errors"] == 0 and ceiling[key]["errors"] == 0}
    checks: dict[str, Any] = {}
    for ipr in (1, 8):
        key = f"{ipr}x32"
        if key in rows:
            checks[f"throughput_{key}"] = {"ratio": rows[key]["ratio"], "target": TARGET_RATIO,
                                           "ok": rows[key]["valid"] and rows[key]["ratio"] >= TARGET_RATIO}
    if "1x1" in classify and "1" in per_batch:
        budget = per_batch["1"]["ms_per_batch"] + TARGET_P50_SLACK_MS
        checks["p50_1x1"] = {"p50_ms": classify["1x1"]["p50_ms"], "budget_ms": round(budget, 2),
                             "ok": classify["1x1"]["p50_ms"] <= budget and classify["1x1"]["errors"] == 0}
    if "1x32" in classify and "32" in per_batch:
        budget = TARGET_P99_FACTOR * per_batch["32"]["ms_per_batch"]
        checks["p99_1x32"] = {"p99_ms": classify["1x32"]["p99_ms"], "budget_ms": round(budget, 2),
                              "ok": classify["1x32"]["p99_ms"] <= budget and classify["1x32"]["errors"] == 0}
    ok = bool(checks) and all(c["ok"] for c in checks.values())
    return {"ratios": rows, "gpu": gpu, "checks": checks, "all_ok": ok}


def markdown(result: dict[str, Any]) -> str:
    m, raw, s = result["machine"], result["raw"], result["summary"]
    lines = [
        "# Serving benchmark (`benchmarks/serve_bench.py`)", "",
        f"Run {result['started']} ({'quick' if result['config']['quick'] else 'full'}; "
        f"{result['config']['duration_s']:.0f} s per load point), artifact `{result['artifact']}`"
        ".",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), CUDA {m['cuda']}, {m['wrk']}. Load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.",
        f"Model: {raw['arch']} width {raw['width']}, bank {raw['bank_size']} x k={raw['k']}, index {raw['index']}, "
        f"device {raw['device']}. Server: `satml-serve`, max batch {result['server']['max_batch']}, "
        f"max wait {result['server']['max_wait_ms']} ms. Load: wrk, 1 thread, closed loop, loopback. "
        f"Extra environment: {result['config']['env'] or 'none'}.", "",
        "## (1) Raw in-process forward + k-NN", "",
        f"Best time per batch over two passes (before and after the HTTP runs) of each runtime measured "
        f"({raw['runtime']}); that is the reference.", "",
        "| batch | best ms / batch | images/s | median ms (each pass) |", "|---:|---:|---:|---:|",
    ]
    for b, v in raw["per_batch"].items():
        meds = ", ".join(f"{x:.1f}" for x in v["median_ms_per_pass"])
        lines.append(f"| {b} | {v['ms_per_batch']:.2f} | {v['images_per_s']:.0f} | {meds} |")
    formula = "min(raw, N x ceiling)" if s["gpu"] else "1 / (1/raw + 1/(N x ceiling))"
    lines += ["", "## (2) ceiling and (3) /classify under load", "",
              f"Bound = {formula}, raw = {max(v['images_per_s'] for v in raw['per_batch'].values()):.0f} images/s "
              "(best batch). Cores = CPU seconds / wall seconds of the server process and of wrk. Conns per "
              "process: the server's established connections in each of its processes, halfway through the run.", "",
              "| images/req | conns | ceiling req/s | /classify req/s | /classify img/s | p50 ms | p99 ms | errors "
              "| bound img/s | ratio to bound | server cores | wrk cores | conns per process |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, r in result["classify"].items():
        c, q = result["ceiling"][key], s["ratios"][key]
        ratio = f"{100 * q['ratio']:.0f} %" if q["valid"] else f"not valid ({100 * q['ratio']:.0f} %, errors)"
        lines.append(f"| {r['images_per_request']} | {r['connections']} | {c['rps']:.0f} | {r['rps']:.0f} | "
                     f"{r['images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                     f"{q['bound_images_per_s']:.0f} | {ratio} | {r.get('server_cores')} | "
                     f"{r.get('wrk_cores')} | {'/'.join(map(str, r.get('connection_split') or [])) or '-'} |")
    if not all(q["valid"] for q in s["ratios"].values()):
        lines += ["", "A point with errors (shed 429/503, timeouts, resets) in the ceiling or the /classify run is "
                  "not valid: its req/s and img/s count answered requests only, and no target is judged on it."]
    lines += ["", "## (4) /attack latency (sequential)", "",
              "| attack | compare | n (answered) | p50 ms | p99 ms | server ms (mean) |",
              "|---|---|---:|---:|---:|---:|"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    for a in result["attack"]:
        lines.append(f"| PGD-{a['steps']} eps {a['eps']} | {a['compare'] or '-'} | {a['n']} ({a.get('ok', a['n'])}) | "
                     f"{ms(a['p50_ms'])} | {ms(a['p99_ms'])} | {a['server_latency_ms_mean']} |")
    lines += ["", "Latencies of answered (200) requests only; the warm-up is retried while the server sheds load."]
    lines += ["", "## Targets (issue 17)", ""]
    names = {"throughput_1x32": "1 image x 32 connections >= 80 % of the bound",
             "throughput_8x32": "8 images x 32 connections >= 80 % of the bound",
             "p50_1x1": "p50 at 1 connection <= raw batch-1 time + 1.5 ms",
             "p99_1x32": "p99 at 32 connections <= 3 x in-process batch of 32"}
    for key, c in s["checks"].items():
        got = (f"{100 * c['ratio']:.0f} %" if "ratio" in c else
               f"{c.get('p50_ms', c.get('p99_ms')):.1f} ms vs {c['budget_ms']:.1f} ms")
        lines.append(f"- {names[key]}: {got}: {'met' if c['ok'] else 'missed'}")
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts", help="artifacts folder the server loads")
    p.add_argument("--model", default="default", help="model to benchmark (folder name)")
    p.add_argument("--quick", action="store_true", help="short smoke run (~1 min): 2 s per point, 1 and 32 conns")
    p.add_argument("--synthetic", action="store_true",
                   help="benchmark random-weight artifacts of the real shapes, built in a temporary folder")
    p.add_argument("--synthetic-width", type=int, default=16, help="resnet10 width of the synthetic encoder")
    p.add_argument("--synthetic-bank", type=int, default=45_000, help="bank size of the synthetic artifact")
    p.add_argument("--gpu", action="store_true",
                   help="a GPU machine: raw and server on CUDA, bound min(raw, N x ceiling)")
    p.add_argument("--duration", type=float, help="seconds per load point (default 10, quick 2)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the raw measurement and both servers, e.g. OMP_WAIT_POLICY=passive "
                        "(repeatable; set before torch is imported)")
    p.add_argument("--out", type=Path, help="output prefix (default benchmarks/results/serve_bench, "
                                             "quick: test-output/serve_bench_quick)")
    a = p.parse_args(argv)
    quick = a.quick
    cfg = BenchConfig(
        artifacts=a.artifacts, model=a.model,
        out_prefix=a.out or (ROOT / "test-output" / "serve_bench_quick" if quick else
                             ROOT / "benchmarks" / "results" / "serve_bench"),
        duration_s=a.duration or (2.0 if quick else 10.0), warmup_s=1.0 if quick else 3.0,
        raw_min_s=0.3 if quick else 2.0,
        concurrency=(1, 32) if quick else (1, 8, 32, 64), images_per_request=(1, 8),
        raw_batches=(1, 8, 32, 64, 256) if a.gpu else (1, 8, 32, 64), attack_n=2 if quick else 10, quick=quick,
        synthetic=a.synthetic, gpu=a.gpu)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg, args = parse_args(argv)
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    os.environ.update(extra_env)  # before torch/faiss load: OpenMP reads its settings once
    if shutil.which("wrk") is None:
        print("serve_bench: wrk not found (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    from app.config import Settings

    if cfg.gpu:
        import torch

        if not torch.cuda.is_available():
            print("serve_bench: --gpu but torch sees no CUDA device", file=sys.stderr)
            return 2
        os.environ["SATML_DEVICE"] = "cuda"  # raw bench and server alike; a silent CPU fallback would lie
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp_:
        tmp = Path(tmp_)
        artifacts = cfg.artifacts
        if cfg.synthetic:
            log.info("building synthetic artifacts (resnet10 width %d, bank %d)", args.synthetic_width,
                     args.synthetic_bank)
            artifacts = make_synthetic_artifacts(tmp / "artifacts", args.synthetic_width, args.synthetic_bank)
        folder = artifacts / cfg.model
        if not (folder / "manifest.json").is_file():
            print(f"serve_bench: no artifact at {folder} (train/export one, or pass --synthetic)", file=sys.stderr)
            return 2
        settings = Settings(artifacts_dir=artifacts, default_model=cfg.model)
        result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_description(),
                                  "artifact": (f"synthetic {cfg.model} (resnet10 width {args.synthetic_width}, "
                                               f"bank {args.synthetic_bank}, random weights)") if cfg.synthetic
                                  else str(folder.resolve().relative_to(ROOT) if folder.resolve().is_relative_to(ROOT)
                                           else folder),
                                  "config": {"quick": cfg.quick, "synthetic": cfg.synthetic, "env": extra_env,
                                             "duration_s": cfg.duration_s, "concurrency": cfg.concurrency,
                                             "images_per_request": cfg.images_per_request},
                                  "server": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms}}

        log.info("(1) raw in-process forward + k-NN, first pass")
        raws = [RawBench(folder)]
        if (folder / "encoder.onnx").is_file():  # the reference is the best runtime, not the one served
            with contextlib.suppress(ImportError, RuntimeError):
                raws.append(RawBench(folder, "onnxruntime"))
            if not cfg.gpu:  # the server's CPU path: the vote inside the onnxruntime graph (app.fused)
                with contextlib.suppress(ImportError, RuntimeError):
                    raws.append(RawBench(folder, "fused"))
        raw_passes = [raw_pass(raw, cfg.raw_batches, cfg.raw_min_s) for raw in raws]

        images = sample_images()
        bodies = {}
        for ipr in cfg.images_per_request:
            bodies[ipr] = tmp / f"body_{ipr}.bin"
            bodies[ipr].write_bytes(multipart_body([images[i % len(images)] for i in range(ipr)]))

        port = free_port()
        log.info("(2) framework ceiling on port %d", port)
        ceiling_cmd = [sys.executable, "-m", "uvicorn", "serve_bench:ceiling_app", "--factory",
                       "--app-dir", str(ROOT / "benchmarks"), "--host", "127.0.0.1", "--port", str(port),
                       "--log-level", "warning", "--no-access-log", "--no-proxy-headers"]
        with server(ceiling_cmd, {}, f"http://127.0.0.1:{port}/docs", tmp / "ceiling.log") as pid:
            result["ceiling"] = load_matrix(f"http://127.0.0.1:{port}/classify", bodies, cfg, "ceiling", pid)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log.info("(3) /classify on satml-serve, port %d", port)
        env = {"SATML_ARTIFACTS_DIR": str(artifacts), "SATML_DEFAULT_MODEL": cfg.model, "SATML_HOST": "127.0.0.1",
               "SATML_PORT": str(port), "SATML_LOG_LEVEL": "warning"}
        serve = shutil.which("satml-serve", path=str(Path(sys.executable).parent)) or "satml-serve"
        with server([serve], env, f"{base}/health/ready", tmp / "server.log") as pid:
            result["classify"] = load_matrix(f"{base}/classify", bodies, cfg, "classify", pid)
            log.info("(4) /attack PGD-10 latency")
            with urllib.request.urlopen(f"{base}/models", timeout=10) as r:
                listed = json.loads(r.read())
            names = [m["name"] for m in (listed if isinstance(listed, list) else listed.get("models", []))]
            others = ",".join(n for n in names if n != cfg.model)
            result["attack"] = [attack_latency(base, images[0], cfg.model, cfg.attack_n)]
            if others:
                result["attack"].append(attack_latency(base, images[0], cfg.model, max(1, cfg.attack_n // 2), others))
        log.info("(1) raw in-process forward + k-NN, second pass")
        raw_passes += [raw_pass(raw, cfg.raw_batches, cfg.raw_min_s) for raw in raws]
        result["raw"] = raw_summary({**raws[0].info, "runtime": " and ".join(r.info["runtime"] for r in raws)},
                                    raw_passes)
        result["machine"]["loadavg_at_end"] = list(os.getloadavg())
        result["summary"] = summarise(result["raw"], result["ceiling"], result["classify"], settings.max_batch,
                                      cfg.gpu)

    write_result(cfg.out_prefix, result, markdown(result))
    return 0


def write_result(prefix: Path, result: dict[str, Any], md: str) -> None:
    """<prefix>.json and <prefix>.md (the table), and the table on stdout: every benchmark's output."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(md)
    print(md)
    print(f"written {prefix}.json and .md")


def emit_result(out: str | None, result: dict[str, Any], lines: list[str]) -> None:
    """`write_result` under the `--out` prefix, or with no `--out` the table on stdout only."""
    if out:
        write_result(Path(out), result, "\n".join(lines) + "\n")
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
