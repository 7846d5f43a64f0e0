"""/classify while /certify runs (issue 14): does a certification starve the requests beside it?

`POST /certify` pushes n0 + n noisy copies of one image (10,100 at the paper's n) through the same batching worker
as `/classify`, one chunk (`SATML_CERTIFY_CHUNK`, default 32, capped at `max_batch`) at a time, so that /classify
batches interleave with the chunks instead of queueing behind thousands of images. This measures it on the real server
(`satml-serve` on 127.0.0.1): wrk drives `/classify` (one image per request) for `--duration` seconds with the
server otherwise idle, then for the same time while a client thread sends `/certify` requests back to back; the
phases alternate for `--rounds` rounds. Reported per phase: /classify requests/s and p50 / p99 latency, and the
certifications' noisy images/s meanwhile. Load and soak rules: loopback only, bounded in count and time.

    python benchmarks/certify_interplay.py --connections 1 8 --rounds 3 --duration 10 --out certify_interplay
    python benchmarks/certify_interplay.py --variant c64:SATML_CERTIFY_CHUNK=64 --variant c32:SATML_CERTIFY_CHUNK=32

Writes benchmarks/results/<--out>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_ab  # a sibling script: its --variant syntax
from serve_bench import (  # a sibling script: the one wrk driver, server runner and result writer
    ROOT,
    emit_result,
    free_port,
    machine_description,
    multipart_body,
    post_multipart,
    run_wrk,
    sample_images,
    server,
)


class CertifyLoop:
    """Sends /certify requests back to back on a thread until stopped; records each one's latency and status."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.body = url, body
        self.latencies_ms: list[float] = []
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="certify-loop", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, _, ms = post_multipart(self.url, self.body, timeout_s=300)
            self.statuses.append(status)
            self.latencies_ms.append(ms)

    def __enter__(self) -> CertifyLoop:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_s = time.perf_counter() - self.t0


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'NAME:SATML_KEY=VALUE,...': serve_ab's variant syntax, without a git revision (this tree's server only)."""
    v = serve_ab.parse_variant(text)
    if v.rev is not None:
        raise argparse.ArgumentTypeError(f"variant {text!r}: no @REV here (this tree's server only)")
    return v.name, v.env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, nargs="+", default=[1, 8], help="wrk connections for /classify")
    p.add_argument("--rounds", type=int, default=3, help="idle / with-certify pairs per connection count")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per phase")
    p.add_argument("--n", type=int, default=10_000, help="/certify estimation samples (the paper's 10,000)")
    p.add_argument("--n0", type=int, default=100, help="/certify selection samples")
    p.add_argument("--sigma", type=float, default=0.25, help="/certify noise std")
    p.add_argument("--model", default="default", help="model both routes use")
    p.add_argument("--env", action="append", default=[], metavar="SATML_KEY=VALUE",
                   help="server setting for every variant, repeatable (e.g. SATML_CERTIFY_CHUNK=16)")
    p.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="NAME:SATML_KEY=VALUE,...",
                   help="server settings of one variant, repeatable: the variants take turns in every round (a "
                        "fresh server each), so a drift of the machine spreads over all of them; none: one variant")
    p.add_argument("--out", default=None, help="results name under benchmarks/results (none: print only)")
    args = p.parse_args(argv)
    if any(not e.startswith("SATML_") or "=" not in e for e in args.env):
        p.error("--env takes SATML_KEY=VALUE")
    if args.rounds < 1 or args.duration <= 0 or min(args.connections) < 1 or args.n < 1 or args.n0 < 1:
        p.error("rounds, connections, n and n0 must be >= 1 and duration > 0")
    args.variant = args.variant or [("server", {})]
    if len({name for name, _ in args.variant}) < len(args.variant):
        p.error("variant names must differ")
    return args


def phase_row(runs: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(float(r[key]) for r in runs)), 2)


def one_round(serve: str, env: dict[str, str], args: argparse.Namespace, bodies: tuple[bytes, bytes],
              rows: dict[int, dict[str, list[dict[str, Any]]]], certs: list[dict[str, Any]]) -> None:
    """A fresh server with `env`: for each connection count, /classify idle, then beside back-to-back /certify."""
    classify_body, certify_body = bodies
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**env, "SATML_PORT": str(port), "SATML_HOST": "127.0.0.1"}
    with tempfile.TemporaryDirectory() as tmp, \
            server([serve], env, f"{base}/health/ready", Path(tmp) / "server.log") as pid:
        body_file = Path(tmp) / "classify.body"
        body_file.write_bytes(classify_body)
        for url, body in ((f"{base}/classify", classify_body), (f"{base}/certify", certify_body)):
            status, payload, _ = post_multipart(url, body, timeout_s=300)
            if status != 200:
                raise RuntimeError(f"{url} answered {status}: {payload}")
        run_wrk(f"{base}/classify", body_file, 8, 2)  # warm-up
        for conns in args.connections:
            phases = rows.setdefault(conns, {"idle": [], "certify": []})
            phases["idle"].append(run_wrk(f"{base}/classify", body_file, conns, args.duration, pid))
            with CertifyLoop(f"{base}/certify", certify_body) as loop:
                time.sleep(0.5)  # the first chunk is in flight before wrk starts
                phases["certify"].append(run_wrk(f"{base}/classify", body_file, conns, args.duration, pid))
            done = [ms for ms, st in zip(loop.latencies_ms, loop.statuses, strict=True) if st == 200]
            certs.append({"connections": conns, "requests": len(loop.statuses), "ok": len(done),
                          "statuses": sorted(set(loop.statuses)), "wall_s": round(loop.wall_s, 2),
                          "median_ms": round(statistics.median(done), 1) if done else None,
                          "noisy_images_per_s": round(len(done) * (args.n + args.n0) / loop.wall_s, 1)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_description()
    image = sample_images()[0]
    common = {"SATML_LOG_LEVEL": "warning", "SATML_CERTIFY_TIMEOUT_S": "300",
              **dict(e.split("=", 1) for e in args.env)}
    bodies = (multipart_body([image], extra={"model": args.model}),
              multipart_body([image], field="file", extra={"model": args.model, "sigma": str(args.sigma),
                                                           "n": str(args.n), "n0": str(args.n0)}))
    serve = str(Path(sys.executable).parent / "satml-serve")
    rows: dict[str, dict[int, dict[str, list[dict[str, Any]]]]] = {name: {} for name, _ in args.variant}
    certs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in args.variant}
    for _ in range(args.rounds):
        for name, env in args.variant:
            one_round(serve, {**common, **env}, args, bodies, rows[name], certs[name])
    machine_end = machine_description()
    result = {"args": {**vars(args), "variant": [{"name": n, "env": e} for n, e in args.variant]},
              "machine": machine, "loadavg_at_end": machine_end["loadavg_at_start"],
              "classify": rows, "certify": certs}
    variants = "; ".join(f"`{n}`: {', '.join(f'{k}={v}' for k, v in e.items()) or 'defaults'}"
                         for n, e in args.variant)
    lines = [
        "# /classify while /certify runs (`benchmarks/certify_interplay.py`, issue 14)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; `python benchmarks/certify_interplay.py "
        + " ".join(sys.argv[1:] if argv is None else argv) + "`.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; load average "
        f"at start {machine['loadavg_at_start']}, at end {machine_end['loadavg_at_start']}. Server: `satml-serve` "
        f"({', '.join(args.env) or 'defaults'}); variants {variants}, taking turns in each round, a fresh server "
        f"each; model `{args.model}`; /classify one image per request under wrk (1 thread, closed loop, loopback), "
        f"{args.duration:g} s per phase, {args.rounds} rounds of idle then with /certify (n = {args.n}, "
        f"n0 = {args.n0}, sigma {args.sigma:g}) sent back to back by one client.",
        "",
        "| /classify connections | variant | phase | req/s per round | median req/s | p50 ms (median) "
        "| p99 ms per round | p99 ms (median) | errors |",
        "|---:|---|---|---|---:|---:|---|---:|---:|",
    ]
    for conns in args.connections:
        for name, _ in args.variant:
            for phase, runs in rows[name][conns].items():
                rps = ", ".join(f"{r['rps']:.0f}" for r in runs)
                p99 = ", ".join(f"{r['p99_ms']:.1f}" for r in runs)
                lines.append(
                    f"| {conns} | {name} | {'server idle' if phase == 'idle' else 'with /certify'} | {rps} | "
                    f"{phase_row(runs, 'rps'):.0f} | {phase_row(runs, 'p50_ms')} | {p99} | "
                    f"{phase_row(runs, 'p99_ms')} | {sum(r['errors'] for r in runs)} |")
    lines += ["", "Certifications during the /certify phases (per round):", "",
              "| /classify connections | variant | /certify requests (ok) | statuses | median s per certificate "
              "| noisy images/s (over the loop's wall time) |", "|---:|---|---:|---|---:|---:|"]
    for name, _ in args.variant:
        for c in sorted(certs[name], key=lambda c: c["connections"]):
            med = "-" if c["median_ms"] is None else f"{c['median_ms'] / 1000:.1f}"
            lines.append(f"| {c['connections']} | {name} | {c['requests']} ({c['ok']}) | {c['statuses']} | {med} "
                         f"| {c['noisy_images_per_s']:.0f} |")
    emit_result(None if args.out is None else str(ROOT / "benchmarks" / "results" / args.out), result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
