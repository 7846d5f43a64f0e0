"""A/B of what loading the served models costs: start-up seconds and resident memory, variants side by side.

Each round starts one fresh Python process per variant (same `--variant NAME[@REV]:SATML_KEY=VALUE,...` syntax
as `serve_ab.py`; a revision runs from a temporary `git worktree`), in rotated order, which loads every model of
`--artifacts` exactly as the server does (`app.registry.load_registry`, batch workers started and warmed up),
classifies one batch of 8 random images per model through the worker (whatever the first request builds is
counted), and reports the load seconds and the process's resident memory (VmRSS, and VmHWM: the peak). The
summary gives each variant's medians and their ratios to the first variant's.

    python benchmarks/load_ab.py --variant before@HEAD~1: --variant now: --rounds 3 --out load_ab_lazy_index

Writes benchmarks/results/<--out>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_ab import Variant, checkouts, parse_variant  # a sibling script: the variant syntax and worktrees
from serve_bench import ROOT, machine_description, write_result

# run in the child, from the variant's source root: load, one batch per model, then the figures as one JSON line
CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
import app
assert app.__file__.startswith({root!r}), app.__file__
from app.config import Settings
from app.metrics import Metrics
from app.registry import load_registry

def status(key):
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(key))

t0 = time.perf_counter()
reg = load_registry(Settings(artifacts_dir={artifacts!r}), Metrics())
load_s = time.perf_counter() - t0
names = sorted(reg.models)
for name in names:
    m = reg.get(name)
    s = m.input_size
    m.worker.submit(torch.rand(8, 3, s, s, generator=torch.Generator().manual_seed(0))).result(60)
out = dict(load_s=load_s, rss_mib=status("VmRSS"), peak_mib=status("VmHWM"), models=names)
reg.close()
print("LOAD_AB_JSON " + json.dumps(out))
"""


def measure(root: Path, artifacts: Path, env: dict[str, str]) -> dict[str, Any]:
    """One fresh process: load + one batch per model; its load seconds and memory."""
    code = CHILD.format(root=str(root), artifacts=str(artifacts))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**_base_env(), **env})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LOAD_AB_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"load failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dict(json.loads(line.removeprefix("LOAD_AB_JSON ")))


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}


def summarise(variants: list[Variant], rounds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    base = {key: statistics.median(r[key] for r in rounds[variants[0].name]) for key in ("load_s", "rss_mib",
                                                                                         "peak_mib")}
    rows = []
    for v in variants:
        med = {key: statistics.median(r[key] for r in rounds[v.name]) for key in base}
        rows.append({"variant": v.name, **{f"{k}_median": round(x, 3) for k, x in med.items()},
                     **{f"{k}_ratio": round(med[k] / base[k], 3) for k in base}})
    return rows


def markdown(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    lines = ["# Model loading A/B (`benchmarks/load_ab.py`)", "",
             f"Run {result['started']} UTC, artifacts `{result['artifacts']}` (models: "
             f"{', '.join(result['models'])}), {result['rounds_n']} rounds, one fresh process per variant per round "
             f"in rotated order. Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Load average at start "
             f"{result['load_average']}.", "", f"    {command}", "",
             "| variant | load s (median) | ratio | RSS MiB after one batch per model | ratio | peak RSS MiB | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        lines.append(f"| {r['variant']} | {r['load_s_median']:.2f} | {r['load_s_ratio']:.2f} "
                     f"| {r['rss_mib_median']:.0f} | {r['rss_mib_ratio']:.2f} "
                     f"| {r['peak_mib_median']:.0f} | {r['peak_mib_ratio']:.2f} |")
    lines += ["", "Every round (load s / RSS MiB / peak MiB):", ""]
    for name, rs in result["rounds"].items():
        lines.append(f"- {name}: " + ", ".join(f"{r['load_s']:.2f} / {r['rss_mib']:.0f} / {r['peak_mib']:.0f}"
                                               for r in rs))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", type=parse_variant, action="append", required=True,
                   help="NAME[@REV]:SATML_KEY=VALUE,... (repeat; the first is the baseline)")
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="load_ab", help="benchmarks/results/<out>.{json,md}")
    args = p.parse_args(argv)
    variants: list[Variant] = args.variant
    if len({v.name for v in variants}) != len(variants) or args.rounds < 1:
        p.error("variant names must differ and --rounds must be >= 1")
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                              "machine": machine_description(), "artifacts": str(args.artifacts),
                              "rounds_n": args.rounds, "load_average": ", ".join(f"{x:.2f}" for x in os.getloadavg())}
    rounds: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp, checkouts(variants, Path(tmp)) as roots:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                fig = measure(roots[v.name], args.artifacts.resolve(), v.env)
                rounds[v.name].append(fig)
                print(f"round {r + 1} {v.name}: load {fig['load_s']:.2f} s, RSS {fig['rss_mib']:.0f} MiB, "
                      f"peak {fig['peak_mib']:.0f} MiB", flush=True)
    result["models"] = rounds[variants[0].name][0]["models"]
    result["rounds"] = rounds
    result["summary"] = summarise(variants, rounds)
    md = markdown(result, "python benchmarks/load_ab.py " + " ".join(sys.argv[1:] if argv is None else argv))
    write_result(ROOT / "benchmarks" / "results" / args.out, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
