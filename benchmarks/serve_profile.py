"""Where the server's time goes at one load point: py-spy samples of `satml-serve` while wrk drives /classify.

The profiles benchmarks/README.md cites (issue 17) were taken this way: start the server as serve_bench does
(loopback, the shipped artifacts, any `SATML_*` settings), warm up, measure the load point once without the
profiler (the profiler slows what it samples), then record py-spy's raw stacks of every thread (`--threads`;
`--idle` adds the samples of threads waiting, `--gil` keeps only those holding the GIL) during a second run of the
same load, and summarise per thread: its share of the samples, the functions on its stack (inclusive) and at its
top (self). With `SATML_WORKERS` > 1 the first worker process is sampled (`--subprocesses` is not used: its
threads would be mixed with the other's).

    python benchmarks/serve_profile.py --images 1 --connections 32 --duration 10
    python benchmarks/serve_profile.py --images 1 --connections 1 --env SATML_WORKERS=2 --idle

Needs py-spy (the dev extra) and wrk, and a process it may trace (ptrace: root, or kernel.yama.ptrace_scope 0).
Writes <out>.md (the summary) and <out>.txt (py-spy's raw stacks, for any other cut); run it with no training
job on the machine (it prints the load average).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # a script beside this one
    ROOT,
    free_port,
    machine_description,
    multipart_body,
    run_wrk,
    sample_images,
    server,
)


@dataclass
class ThreadProfile:
    """One thread's samples: total, per function on the stack (counted once per sample) and at its top."""

    name: str
    samples: int = 0
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    self_: collections.Counter[str] = field(default_factory=collections.Counter)


def frame_key(frame: str) -> str:
    """py-spy's `func (path/to/file.py:123)` -> `func (file.py)`: one row per function, whatever line sampled."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return func
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{func} ({Path(file).name})"


def aggregate(lines: Iterable[str]) -> dict[str, ThreadProfile]:
    """py-spy `--format raw --threads` lines (`thread (id): name;frame;frame... count`) -> per-thread profiles,
    keyed by the thread's name (threads of one name, e.g. a pool's, are summed)."""
    threads: dict[str, ThreadProfile] = {}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread ") else frames[0]
        t = threads.setdefault(name, ThreadProfile(name))
        n = int(count)
        t.samples += n
        keys = [frame_key(f) for f in frames[1:]]
        for key in set(keys):
            t.inclusive[key] += n
        if keys:
            t.self_[keys[-1]] += n
    return threads


def markdown(threads: dict[str, ThreadProfile], head: list[str], top: int) -> str:
    """Threads by samples; for the busiest, the top functions inclusive and self, in % of that thread's samples."""
    total = sum(t.samples for t in threads.values()) or 1
    lines = [*head, "", "| thread | samples | share of all samples |", "|---|---:|---:|"]
    ranked = sorted(threads.values(), key=lambda t: -t.samples)
    lines += [f"| {t.name} | {t.samples} | {100 * t.samples / total:.1f} % |" for t in ranked]
    for t in ranked[:3]:
        lines += ["", f"## {t.name} ({t.samples} samples)", "", "| function (file) | inclusive | self |",
                  "|---|---:|---:|"]
        for key, n in t.inclusive.most_common(top):
            lines.append(f"| `{key}` | {100 * n / t.samples:.1f} % | {100 * t.self_[key] / t.samples:.1f} % |")
    return "\n".join(lines) + "\n"


def first_worker(pid: int) -> int:
    """The process serving requests: uvicorn's first worker process with several workers, else `pid` itself."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pid
    workers = [int(c) for c in children if is_worker_cmdline(Path(f"/proc/{c}/cmdline").read_bytes())]
    return workers[0] if workers else pid


def is_worker_cmdline(cmdline: bytes) -> bool:
    """uvicorn's worker processes are multiprocessing spawns (`spawn_main`); its resource tracker is not one."""
    return b"multiprocessing.spawn" in cmdline and b"spawn_main" in cmdline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--model", default="default")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each wrk run (unprofiled, profiled)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--env", action="append", default=[], metavar="SATML_KEY=VALUE", help="server setting (repeat)")
    p.add_argument("--idle", action="store_true", help="also sample threads that wait")
    p.add_argument("--gil", action="store_true", help="only samples of the thread holding the GIL")
    p.add_argument("--top", type=int, default=30, help="functions listed per thread")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default: benchmarks/results/serve_profile_<images>x<connections>)")
    a = p.parse_args(argv)
    for kv in a.env:
        if "=" not in kv or not kv.startswith("SATML_"):
            p.error(f"--env {kv!r}: not SATML_KEY=VALUE")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for tool in ("py-spy", "wrk"):
        if shutil.which(tool) is None:
            print(f"serve_profile: {tool} not found (py-spy: pip install py-spy, in the dev extra; wrk: apt-get "
                  "install wrk)", file=sys.stderr)
            return 2
    out = a.out or ROOT / "benchmarks" / "results" / f"serve_profile_{a.images}x{a.connections}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="serve_profile_"))
    images = sample_images()
    body = tmp / "body.bin"
    body.write_bytes(multipart_body([images[i % len(images)] for i in range(a.images)]))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"SATML_ARTIFACTS_DIR": str(a.artifacts), "SATML_DEFAULT_MODEL": a.model, "SATML_HOST": "127.0.0.1",
           "SATML_PORT": str(port), "SATML_LOG_LEVEL": "warning", **dict(kv.split("=", 1) for kv in a.env)}
    load = os.getloadavg()
    cmd = [str(Path(sys.executable).parent / "satml-serve")]
    with server(cmd, env, f"{base}/health/ready", tmp / "server.log") as pid:
        run_wrk(f"{base}/classify", body, a.connections, 3, pid)  # warm-up
        plain = run_wrk(f"{base}/classify", body, a.connections, a.duration, pid)
        target = first_worker(pid)
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(target), "--duration", str(max(1, round(a.duration))), "--rate",
             str(a.rate), "--format", "raw", "--threads", "--nonblocking", *(["--idle"] if a.idle else []),
             *(["--gil"] if a.gil else []), "-o", str(out.with_suffix(".txt"))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # py-spy attached before the load starts
        profiled = run_wrk(f"{base}/classify", body, a.connections, a.duration, pid)
        _, err = spy.communicate(timeout=a.duration + 60)
        if spy.returncode != 0 or not out.with_suffix(".txt").exists():
            print(f"serve_profile: py-spy failed ({spy.returncode}): {err[-500:]}", file=sys.stderr)
            return 1
    threads = aggregate(out.with_suffix(".txt").read_text().splitlines())
    m = machine_description()
    head = [f"# Server profile: {a.images} image(s) x {a.connections} connections (`benchmarks/serve_profile.py`)",
            "",
            f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, `{' '.join(sys.argv)}`. Machine: "
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores; load average at start "
            f"{', '.join(f'{x:.2f}' for x in load)}. Settings: {a.env or 'defaults'}. py-spy {a.rate} Hz, "
            f"{'idle threads included' if a.idle else 'active samples only'}{', GIL holders only' if a.gil else ''}.",
            "",
            f"/classify without the profiler: {plain['rps'] * a.images:.0f} img/s, p50 {plain['p50_ms']:.1f} ms, "
            f"server {plain['server_cores']} cores; while profiled: {profiled['rps'] * a.images:.0f} img/s, p50 "
            f"{profiled['p50_ms']:.1f} ms. Raw stacks: `{out.with_suffix('.txt').name}`."]
    out.with_suffix(".md").write_text(markdown(threads, head, a.top))
    print(out.with_suffix(".md").read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
