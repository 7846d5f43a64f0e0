"""Ray Serve replicas vs the plain server, side by side in one run: /classify throughput and latency with wrk
on 127.0.0.1, for `satml-serve` (one uvicorn process), `satml-ray-serve --replicas 1` (2 CPUs, 2 threads) and
`--replicas 2` (1 CPU, 1 thread each) over the same artifacts (issue 16).

    python benchmarks/ray_bench.py [--duration 10] [--out benchmarks/results/ray_bench]

Needs wrk (apt-get install -y wrk) and the ray extra. Prints a table and writes <out>.json and <out>.md. Run it
on an idle machine (the load average is recorded): every server here shares the same cores with wrk.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # a sibling script, not a package
    ROOT,
    free_port,
    machine_description,
    multipart_body,
    post_multipart,
    run_wrk,
    sample_images,
    wait_ready,
    write_result,
)

log = logging.getLogger("ray_bench")
LOADS = ((1, 1), (1, 32), (8, 32))  # (images per request, connections)


def configurations(port: int, artifacts: str) -> dict[str, list[str]]:
    common = ["--port", str(port), "--artifacts-dir", artifacts, "--log-level", "warning"]
    return {
        "satml-serve (1 process)": [sys.executable, "-m", "app.serve", *common],
        "ray serve, 1 replica x 2 CPUs": [sys.executable, "-m", "app.ray_serve", "--replicas", "1",
                                          "--cpus-per-replica", "2", *common],
        "ray serve, 2 replicas x 1 CPU": [sys.executable, "-m", "app.ray_serve", "--replicas", "2",
                                          "--cpus-per-replica", "1", *common],
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (satml-ray-serve then takes its local Ray cluster down), then SIGKILL the whole group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _replicas_up(want: int) -> bool:
    out = subprocess.run(["pgrep", "-f", "ray::ServeReplica:satml:Replica"], capture_output=True, text=True)
    return len(out.stdout.split()) >= want


def bench_one(label: str, cmd: list[str], port: int, bodies: dict[int, Path], duration_s: float,
              log_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    env["SATML_WORKERS"] = "1"  # the "1 process" row; Serve's replicas are one process each anyway
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        t0 = time.perf_counter()
        wait_ready(f"{url}/health/ready", 300, proc)
        want = int(cmd[cmd.index("--replicas") + 1]) if "--replicas" in cmd else 0
        while want and not _replicas_up(want):
            time.sleep(0.5)
        start_s = time.perf_counter() - t0
        for ipr, body in bodies.items():
            status, payload, _ = post_multipart(f"{url}/classify", body.read_bytes())
            if status != 200:
                raise RuntimeError(f"{label}: {ipr}-image request answered {status}: {payload}")
        run_wrk(f"{url}/classify", bodies[1], 8, 3)  # warm-up
        points = {}
        for ipr, conns in LOADS:
            r = run_wrk(f"{url}/classify", bodies[ipr], conns, duration_s, proc.pid)
            r["images_per_s"] = round(r["rps"] * ipr, 1)
            points[f"{ipr}x{conns}"] = r
            log.info("%s %dx%d: %.0f img/s p50 %.1f p99 %.1f ms errors %d cores %s", label, ipr, conns,
                     r["images_per_s"], r["p50_ms"], r["p99_ms"], r["errors"], r["server_cores"])
        return {"command": " ".join(Path(c).name if c == sys.executable else c for c in cmd),
                "ready_after_s": round(start_s, 1), "points": points}
    finally:
        _stop(proc)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Ray Serve replicas vs the plain server (`benchmarks/ray_bench.py`)", "",
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, {m['wrk']}; load average "
        f"{m['loadavg_at_start']} at the start, {result['loadavg_at_end']} at the end. Artifacts "
        f"`{result['artifacts']}` (default model), wrk on 127.0.0.1, {result['duration_s']:g} s per point, "
        "sample CIFAR-10 PNGs.", "",
        "| server | ready after | 1 img x 1 conn: p50 / p99 | 1 img x 32 conns: img/s, p99 | 8 img x 32 conns: img/s, "
        "p99 | errors | server cores (1x32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in result["servers"].items():
        p = r["points"]
        errors = sum(pt["errors"] for pt in p.values())
        lines.append(f"| {label} | {r['ready_after_s']} s | {p['1x1']['p50_ms']:.1f} / {p['1x1']['p99_ms']:.1f} ms "
                     f"| {p['1x32']['images_per_s']:.0f}, {p['1x32']['p99_ms']:.0f} ms "
                     f"| {p['8x32']['images_per_s']:.0f}, {p['8x32']['p99_ms']:.0f} ms | {errors} "
                     f"| {p['1x32']['server_cores']} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in result["servers"].values()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load point (default 10)")
    p.add_argument("--artifacts-dir", default=str(ROOT / "artifacts"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_bench"))
    p.add_argument("--only", help="run only the configurations whose label contains this")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    images = sample_images()
    tmp = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    bodies = {}
    for n in sorted({ipr for ipr, _ in LOADS}):
        bodies[n] = tmp / f"body{n}.bin"
        bodies[n].write_bytes(multipart_body([images[i % len(images)] for i in range(n)]))
    result: dict[str, Any] = {"machine": machine_description(), "artifacts": args.artifacts_dir,
                              "duration_s": args.duration, "servers": {}}
    port = free_port()
    for label, cmd in configurations(port, args.artifacts_dir).items():
        if args.only and args.only not in label:
            continue
        log_path = tmp / f"server{len(result['servers'])}.log"
        result["servers"][label] = bench_one(label, cmd, port, bodies, args.duration, log_path)
    result["loadavg_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    write_result(out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
