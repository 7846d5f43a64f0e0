"""training/robustness/verdict.py: pre-set rules read against a suite report (`satml robustness-verdict`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from training.cli import main
from training.robustness.verdict import figures, judge, parse_rule


def row(path: str, clean: float, exact: float, worst: float, name: str = "default (default)") -> dict[str, object]:
    return {"name": name, "path": path, "clean": {"acc": clean, "n": 1000, "exact_acc": exact, "exact_n": 1017},
            "worst_case": {"acc": worst, "n": 1000}}


REPORT = {"models": [row("artifacts/default", 0.668, 0.684, 0.289), row("runs/r28/art/default", 0.681, 0.70, 0.301)]}


def test_rules_parse_and_refuse_what_they_cannot_mean() -> None:
    assert parse_rule("worst=0.3,clean=0.665") == {"worst": 0.3, "clean": 0.665}
    assert parse_rule(" exact=0.7") == {"exact": 0.7}
    for bad in ("worst", "robust=0.3", "worst=30", "worst=x", "worst=0.3,worst=0.2", "worst=-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rule(bad)


def test_the_row_is_found_by_the_last_folders_of_its_path_and_must_be_unique() -> None:
    assert figures(REPORT, "r28/art/default") == {"clean": 0.681, "exact": 0.70, "worst": 0.301}
    assert figures(REPORT, "artifacts/default")["worst"] == 0.289
    with pytest.raises(LookupError, match="2 rows"):
        figures(REPORT, "default")  # both rows' paths end in default
    with pytest.raises(LookupError, match="0 rows"):
        figures(REPORT, "28/art/default")  # a folder name's tail is not a folder
    assert figures({"models": [row("x/y", 0.5, 0.5, 0.1, name="pgd_at")]}, "pgd_at")["clean"] == 0.5


def test_one_rule_whose_minimums_all_hold_passes() -> None:
    values = {"clean": 0.66, "exact": 0.71, "worst": 0.30}
    assert judge(values, [{"worst": 0.30, "clean": 0.66}])
    assert not judge(values, [{"worst": 0.301, "clean": 0.66}])
    assert judge(values, [{"worst": 0.319, "clean": 0.66}, {"exact": 0.70, "worst": 0.30}])  # the alternative
    assert not judge({"clean": 0.7, "exact": None, "worst": 0.4}, [{"exact": 0.5}])  # a missing figure holds none


def test_cli_exit_status_is_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "robustness.json"
    report.write_text(json.dumps(REPORT))
    args = ["robustness-verdict", str(report), "--model", "r28/art/default"]
    assert main([*args, "--rule", "worst=0.299,clean=0.663"]) == 0
    assert "PASSES" in capsys.readouterr().out
    assert main([*args, "--rule", "worst=0.319,clean=0.66"]) == 1
    assert "fails (worst >= 31.9 %, clean >= 66 %)" in capsys.readouterr().out
    assert main([*args, "--rule", "worst=0.319", "--rule", "exact=0.70,worst=0.30"]) == 0
    assert main(["robustness-verdict", str(report), "--model", "default", "--rule", "worst=0.1"]) == 2
    assert main(["robustness-verdict", str(tmp_path / "none.json"), "--model", "x", "--rule", "worst=0.1"]) == 2


def test_a_stop_record_fails_every_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`satml robustness --stop-below` leaves stopped.json instead of the report: the verdict reads it as a fail,
    even for a rule its upper-bound worst case would meet (the attacks not run could lower it)."""
    model = {**row("runs/r33/art/default", 0.679, 0.679, 0.31), "attacks": {"pgd20": 0.33}}
    (tmp_path / "stopped.json").write_text(json.dumps({
        "reason": "clean 67.90 % < 68.6 % after clean", "after": "clean", "model": model,
        "figures": {"clean": 0.679, "exact": 0.679, "worst": None}}))
    report = str(tmp_path / "robustness.json")
    assert main(["robustness-verdict", report, "--model", "r33/art/default", "--rule", "worst=0.1"]) == 1
    out = capsys.readouterr().out
    assert "stopped early (clean 67.90 % < 68.6 % after clean)" in out and "fails (worst >= 10 %)" in out
    assert main(["robustness-verdict", report, "--model", "r31/art/default", "--rule", "worst=0.1"]) == 2


def test_cli_stop_below_exits_3_with_the_record(tiny_artifact: Path, tiny_cifar: Path, tmp_path: Path) -> None:
    """The real command on a tiny (untrained) artifact: a clean minimum it cannot meet stops it before any attack;
    the verdict then reads the record."""
    out = tmp_path / "gate"
    args = ["robustness", str(tiny_artifact), "--data", str(tiny_cifar), "--quick", "--out", str(out),
            "--transfer-source", "none", "--device", "cpu", "--no-progress"]
    assert main([*args, "--stop-below", "clean=0.99"]) == 3
    record = json.loads((out / "stopped.json").read_text())
    assert record["after"] == "clean" and record["figures"]["clean"] < 0.99 and record["model"]["attacks"] == {}
    assert not (out / "robustness.json").exists()
    assert main(["robustness-verdict", str(out / "robustness.json"), "--model", record["model"]["name"],
                 "--rule", "clean=0.5"]) == 1
    with pytest.raises(SystemExit):
        main([*args, "--stop-below", "robust=0.3"])
