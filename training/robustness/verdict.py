"""`satml robustness-verdict`: a pre-set rule read against a suite report, for unattended candidate chains.

Issue 10's candidates are judged by rules written before any of their figures (benchmarks/results/recipes.md): a gate
on the validation split, then a ship rule on the test suite, each "worst case >= a and clean >= b", sometimes with an
alternative (the issue's goal). A chain script that runs for hours needs the verdict from the report's JSON, not
from a person reading the markdown; one reader here instead of a Python snippet per run script. It ships nothing.

    satml robustness-verdict runs/r28/val_gate/robustness.json --model r28/art/default \
        --rule worst=0.284,clean=0.678
    satml robustness-verdict runs/r28/suite/robustness.json --model r28/art/default \
        --rule exact=0.70,worst=0.30,clean=0.665

A rule is a comma-separated list of minimums on `clean` (all clean images), `exact` (the exact test images) and
`worst` (the suite's per-image worst case); the verdict passes when every minimum of at least one `--rule` holds.
Exit status 0: passes, 1: fails, 2: the report or the model is not there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FIGURES = ("clean", "exact", "worst")
STOPPED = "stopped.json"  # what a suite run with --stop-below writes instead of its report when it stops


class SuiteStopped(Exception):
    """`satml robustness --stop-below`: a figure fell under its minimum, so the suite stopped attacking (exit 3).
    `record` is what `stopped.json` holds: the model, the figure, the minimum and the figures measured so far."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["reason"])
        self.record = record


def parse_rule(text: str) -> dict[str, float]:
    """'worst=0.3,clean=0.66' -> {'worst': 0.3, 'clean': 0.66}; minimums are fractions in [0, 1]."""
    rule: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in FIGURES:
            raise argparse.ArgumentTypeError(f"expected FIGURE=MIN[,...] with FIGURE one of {', '.join(FIGURES)}; "
                                             f"got {part!r}")
        try:
            minimum = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None
        if not 0 <= minimum <= 1:
            raise argparse.ArgumentTypeError(f"{name}: minimums are fractions in [0, 1] (0.3 for 30 %), got {minimum}")
        if name in rule:
            raise argparse.ArgumentTypeError(f"{name} given twice in {text!r}")
        rule[name] = minimum
    return rule


def figures(report: dict[str, Any], model: str) -> dict[str, float | None]:
    """The model's clean, exact and worst-case accuracies in a suite report (`robustness.json`). `model` matches a
    row by its name or the last folders of its artifact path (a gate holds a candidate named `default` beside the
    shipped one: `r28/art/default` tells them apart); exactly one row must match."""
    want = Path(model).parts
    rows = [m for m in report.get("models", [])
            if m.get("name") == model or Path(str(m.get("path", ""))).parts[-len(want):] == want]
    if len(rows) != 1:
        names = [m.get("path") or m.get("name") for m in report.get("models", [])]
        raise LookupError(f"{len(rows)} rows match {model!r} (rows: {names})")
    m = rows[0]
    worst = m.get("worst_case") or {}
    return {"clean": m["clean"]["acc"], "exact": m["clean"].get("exact_acc"), "worst": worst.get("acc")}


def judge(values: dict[str, float | None], rules: list[dict[str, float]]) -> bool:
    """Whether every minimum of at least one rule holds (a figure the report lacks holds none)."""
    return any(all(values.get(k) is not None and values[k] >= v for k, v in rule.items())  # type: ignore[operator]
               for rule in rules)


def describe(values: dict[str, float | None], rules: list[dict[str, float]], passed: bool) -> str:
    shown = ", ".join(f"{k} {'-' if v is None else f'{100 * v:.2f} %'}" for k, v in values.items())
    wanted = " or ".join("(" + ", ".join(f"{k} >= {100 * v:g} %" for k, v in rule.items()) + ")" for rule in rules)
    return f"{shown}: {'PASSES' if passed else 'fails'} {wanted}"


def add_cli(sub: Any) -> None:
    """Register `satml robustness-verdict`."""
    p = sub.add_parser("robustness-verdict", help="a pre-set rule (minimum clean / exact / worst-case accuracy) "
                       "against one model of a suite report; exit 0 passes, 1 fails",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("report", type=Path, help="a suite's robustness.json")
    p.add_argument("--model", required=True, help="the row: its name, or the end of its artifact path")
    p.add_argument("--rule", type=parse_rule, action="append", required=True,
                   help="FIGURE=MIN[,...] with FIGURE in clean, exact, worst (fractions); repeat for alternatives")
    p.set_defaults(func=cmd_verdict)


def cmd_verdict(args: argparse.Namespace) -> dict[str, Any]:
    stop = args.report.with_name(STOPPED)
    if not args.report.exists() and stop.exists():  # a fail-fast run stopped: it fails every rule on the stopped figure
        record = json.loads(stop.read_text())
        try:
            values, passed = figures({"models": [record["model"]]}, args.model), False
        except LookupError as e:
            raise ValueError(f"{stop}: {e}") from None
        sys.stdout.write(f"{args.model} in {stop}: stopped early ({record['reason']}); "
                         f"{describe(values, args.rule, passed)}\n")
        sys.stdout.flush()
        raise VerdictFailed
    report = json.loads(args.report.read_text())
    try:
        values = figures(report, args.model)
    except LookupError as e:
        raise ValueError(f"{args.report}: {e}") from None
    passed = judge(values, args.rule)
    sys.stdout.write(f"{args.model} in {args.report}: {describe(values, args.rule, passed)}\n")
    sys.stdout.flush()
    if not passed:
        raise VerdictFailed
    return {"model": args.model, "passed": passed, **values}


class VerdictFailed(Exception):
    """The rule failed: `satml` exits 1 (a chain script's `|| ...` branch), not 2 (a broken input)."""
