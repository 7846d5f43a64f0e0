"""A/B of serving variants, side by side in one run: `/classify` under wrk, the variants taking turns.

A variant is a set of `SATML_*` settings (`--variant NAME:KEY=VALUE,...`) and optionally a git revision of the
app (`--variant NAME@REV:...`: that revision's `app/` and `training/` from a temporary `git worktree`, the
artifacts and the load the same). Rounds alternate the variants (A B C A B C ...) so that a drift of the machine
(another job, thermal, the host) spreads over all of them; each load point reports every round, the median and
the ratio to the first variant's median. A fresh server per variant per round, warmed up before timing.

    python benchmarks/serve_ab.py --variant off:SATML_SMALL_BATCH_MAX=0 --variant on: --rounds 3
    python benchmarks/serve_ab.py --variant before@HEAD~1: --variant now: --points 1x32 8x32

Writes benchmarks/results/<--out>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # a sibling script: the one wrk driver and result writer
    ROOT,
    free_port,
    machine_description,
    multipart_body,
    run_wrk,
    sample_images,
    server,
    write_result,
)


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str]
    rev: str | None = None  # git revision of the app; None: this working tree


def parse_variant(text: str) -> Variant:
    """'NAME[@REV]:KEY=VALUE,KEY=VALUE' (the part after ':' may be empty)."""
    head, sep, rest = text.partition(":")
    if not sep or not head:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME[@REV]:KEY=VALUE,...")
    name, _, rev = head.partition("@")
    env = {}
    for kv in filter(None, rest.split(",")):
        key, eq, value = kv.partition("=")
        if not eq or not key.startswith("SATML_"):
            raise argparse.ArgumentTypeError(f"variant {text!r}: {kv!r} is not SATML_KEY=VALUE")
        env[key] = value
    return Variant(name, env, rev or None)


def parse_point(text: str) -> tuple[int, int]:
    """'IMAGESxCONNECTIONS', e.g. 1x32."""
    try:
        images, conns = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"point {text!r}: expected IMAGESxCONNECTIONS, e.g. 1x32") from e
    if images < 1 or conns < 1:
        raise argparse.ArgumentTypeError(f"point {text!r}: both numbers must be >= 1")
    return images, conns


@contextlib.contextmanager
def checkouts(variants: list[Variant], tmp: Path) -> Iterator[dict[str, Path]]:
    """The source root per variant: this tree, or a detached worktree of its revision (removed after)."""
    roots: dict[str, Path] = {}
    made: list[Path] = []
    try:
        for v in variants:
            if v.rev is None:
                roots[v.name] = ROOT
                continue
            path = tmp / f"rev_{v.name}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), v.rev], check=True)
            made.append(path)
            roots[v.name] = path
        yield roots
    finally:
        for path in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def server_cmd(root: Path) -> list[str]:
    """`satml-serve` of the sources under `root` (the installed console script imports this tree's app)."""
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import app; "
            f"assert app.__file__.startswith({str(root)!r}), app.__file__; from app.serve import main; main()")
    return [sys.executable, "-c", code]


def run(args: argparse.Namespace) -> dict[str, Any]:
    variants: list[Variant] = args.variant
    images = sample_images()
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_description(),
                              "artifacts": str(args.artifacts), "model": args.model, "rounds": args.rounds,
                              "duration_s": args.duration,
                              "variants": [{"name": v.name, "env": v.env, "rev": v.rev} for v in variants],
                              "points": [f"{n}x{c}" for n, c in args.points], "runs": [],
                              "paired": args.paired, "warmup_s": args.warmup if args.paired else 0}
    with tempfile.TemporaryDirectory(prefix="serve_ab_") as tmp_, checkouts(variants, Path(tmp_)) as roots:
        tmp = Path(tmp_)
        bodies = {}
        for n in sorted({n for n, _ in args.points}):
            bodies[n] = tmp / f"body_{n}.bin"
            bodies[n].write_bytes(multipart_body([images[i % len(images)] for i in range(n)]))
        if args.paired:
            paired_rounds(args, variants, roots, bodies, tmp, result)
        else:
            for r in range(args.rounds):
                for v in variants:
                    with variant_server(args, v, roots[v.name], bodies, tmp) as (base, pid):
                        for n, conns in args.points:
                            measure(result, r, v, base, pid, bodies[n], n, conns, args.duration)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["summary"] = summarise(result)
    return result


def server_env(args: argparse.Namespace, v: Variant, port: int) -> dict[str, str]:
    return {"SATML_ARTIFACTS_DIR": str(args.artifacts), "SATML_DEFAULT_MODEL": args.model, "SATML_HOST": "127.0.0.1",
            "SATML_PORT": str(port), "SATML_LOG_LEVEL": "warning", **v.env}


@contextlib.contextmanager
def variant_server(args: argparse.Namespace, v: Variant, root: Path, bodies: dict[int, Path],
                   tmp: Path) -> Iterator[tuple[str, int]]:
    """A variant's server on a free port, warmed up (8 connections, 2 s): (base URL, pid) until the block ends."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server(server_cmd(root), server_env(args, v, port), f"{base}/health/ready", tmp / f"{v.name}.log") as pid:
        run_wrk(f"{base}/classify", bodies[1 if 1 in bodies else min(bodies)], 8, 2, pid)
        yield base, pid


def measure(result: dict[str, Any], r: int, v: Variant, base: str, pid: int, body: Path, n: int, conns: int,
            duration: float) -> None:
    """One wrk run of a variant at one point, recorded in `result["runs"]` and printed."""
    out = run_wrk(f"{base}/classify", body, conns, duration, pid)
    row = {"round": r, "variant": v.name, "point": f"{n}x{conns}", "images_per_s": out["rps"] * n, **out}
    result["runs"].append(row)
    print(f"round {r} {v.name:>12} {n}x{conns}: {row['images_per_s']:.0f} img/s, p50 {out['p50_ms']:.1f} ms, "
          f"p99 {out['p99_ms']:.1f} ms, errors {out['errors']}, conns per process {out.get('connection_split')}",
          flush=True)


def paired_rounds(args: argparse.Namespace, variants: list[Variant], roots: dict[str, Path], bodies: dict[int, Path],
                  tmp: Path, result: dict[str, Any]) -> None:
    """`--paired`: every variant's server up at once (an idle one waits without spinning), and per round and
    point the variants measured back to back, their order rotated round by round: a drift of the machine
    reaches both arms of a pair within seconds, and no variant always goes first. Each measurement follows an
    untimed `--warmup` run of the same variant at the same point: a server that sat idle while the others ran
    answered its first requests slowly (the p99 of 1 x 1 read 70-150 ms in some paired rounds, 5-14 ms in
    single-server runs)."""
    with contextlib.ExitStack() as stack:
        up = {v.name: stack.enter_context(variant_server(args, v, roots[v.name], bodies, tmp)) for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for n, conns in args.points:
                for v in order:
                    base, pid = up[v.name]
                    if args.warmup > 0:
                        run_wrk(f"{base}/classify", bodies[n], conns, args.warmup, pid)
                    measure(result, r, v, base, pid, bodies[n], n, conns, args.duration)


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per point and variant: the rounds' images/s and p99, their medians, the ratio of the medians to the first
    variant's, and the paired ratios: round by round, this variant's images/s over the first variant's in the same
    round (runs minutes apart in the default mode, seconds apart with --paired), with their median."""
    rows = []
    names = [v["name"] for v in result["variants"]]
    for point in result["points"]:
        medians, by_round = {}, {}
        for name in names:
            runs = [x for x in result["runs"] if x["point"] == point and x["variant"] == name]
            by_round[name] = {x["round"]: x["images_per_s"] for x in runs if "round" in x}
            ips = [x["images_per_s"] for x in runs]
            p99 = [x["p99_ms"] for x in runs]
            medians[name] = statistics.median(ips)
            paired = [by_round[name][r] / first for r, first in by_round[names[0]].items()
                      if first and r in by_round[name]]
            rows.append({"point": point, "variant": name, "images_per_s": ips, "median": medians[name],
                         "p50_median": statistics.median(x["p50_ms"] for x in runs),
                         "p99_ms": p99, "p99_median": statistics.median(p99),
                         "errors": sum(x["errors"] for x in runs),
                         "ratio": medians[name] / medians[names[0]] if medians[names[0]] else None,
                         "paired_ratios": paired, "paired_median": statistics.median(paired) if paired else None})
    return rows


def markdown(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    own = [v["name"] for v in result["variants"] if "SATML_ARTIFACTS_DIR" in v["env"]]
    where = (f"`{result['artifacts']}/{result['model']}`" if not own else
             f"model `{result['model']}` from each variant's `SATML_ARTIFACTS_DIR` (else `{result['artifacts']}`)")
    mode = (f"{result['rounds']} rounds, every variant's server up throughout, the variants back to back per point "
            f"and their order rotated each round (--paired), each measurement after {result.get('warmup_s', 0):g} s of "
            "untimed load at its point." if result.get("paired") else
            f"{result['rounds']} rounds, the variants alternating, a fresh server per variant per round.")
    lines = [f"# Serving A/B (`benchmarks/serve_ab.py`): {', '.join(v['name'] for v in result['variants'])}", "",
             f"Run {result['started']}; `{command}`.",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}; load average "
             f"at start {m['loadavg_at_start']}, at end {m['loadavg_at_end']}. Artifact {where}; "
             f"wrk 1 thread, closed loop, loopback, {result['duration_s']:g} s per point; {mode}", "",
             "| variant | settings | revision |", "|---|---|---|"]
    for v in result["variants"]:
        env = ", ".join(f"`{k}={val}`" for k, val in v["env"].items()) or "defaults"
        lines.append(f"| {v['name']} | {env} | {v['rev'] or 'working tree'} |")
    lines += ["", "| point (images x connections) | variant | img/s per round | median img/s | ratio to first | "
              "paired ratios per round (median) | p99 ms per round | p50 ms (median) | errors |",
              "|---|---|---|---:|---:|---|---|---:|---:|"]
    for row in result["summary"]:
        paired = row.get("paired_ratios") or []
        paired_text = (f"{', '.join(f'{x:.2f}' for x in paired)} ({row['paired_median']:.2f})" if paired else "-")
        lines.append(f"| {row['point']} | {row['variant']} | {', '.join(f'{x:.0f}' for x in row['images_per_s'])} | "
                     f"{row['median']:.0f} | {'-' if row['ratio'] is None else format(row['ratio'], '.2f')} | "
                     f"{paired_text} | {', '.join(f'{x:.1f}' for x in row['p99_ms'])} | "
                     f"{row['p50_median']:.1f} | {row['errors']} |")
    lines += ["", "A point with errors (shed 429/503, timeouts) is not a valid throughput figure (img/s counts "
              "answered requests only)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", type=parse_variant, action="append", required=True,
                   help="NAME[@GITREV]:SATML_KEY=VALUE,... (repeat; the first is the reference)")
    p.add_argument("--points", type=parse_point, nargs="+", default=[(1, 1), (1, 32), (8, 32)])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--paired", action="store_true",
                   help="all servers up at once; per round and point the variants back to back, order rotated")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="with --paired: seconds of untimed load at the same point before each measurement (0: none; "
                        "wrk runs whole seconds)")
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="serve_ab", help="results name under benchmarks/results/")
    args = p.parse_args(argv)
    if len({v.name for v in args.variant}) != len(args.variant):
        p.error("variant names must differ")
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--rounds must be >= 1, --duration > 0 and --warmup >= 0")
    result = run(args)
    command = "python benchmarks/serve_ab.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result(ROOT / "benchmarks" / "results" / args.out, result, markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
