"""scripts/ship_candidate.sh: the checks that refuse a ship before anything changes, and the files a ship moves.

Run in a throwaway git repository. `satml robustness-card` and `satml robustness-report` (the card and the merge,
which read real artifacts; tested in tests/training) are stubs that log their calls; `satml robustness-verdict`,
which decides whether anything ships, is the real command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIP = ROOT / "scripts" / "ship_candidate.sh"
R = "benchmarks/results"

STUB = f"""#!/usr/bin/env bash
case "$1" in
robustness-card) echo "card $*" >> log; echo "card of the suite" >> "$2/card.md" ;;
robustness-report) echo "report ${{*:2}}" >> log ;;
*) exec {sys.executable} -m training.cli "$@" ;;
esac
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with a shipped default (files, its report, the merged table) and a candidate run `runs/rx`
    whose suite found clean 66.6 %, exact 70.1 %, worst case 30.2 %."""
    files = {
        "artifacts/default/card.md": "old card\n", "artifacts/default/encoder.onnx": "old weights",
        f"{R}/robustness_default.json": '{"old": true}', f"{R}/robustness_default.md": "old report\n",
        f"{R}/robustness_default_eps.png": "old png",
        f"{R}/robustness.json": json.dumps({"merged_from": [
            {"file": f"{R}/robustness_default.json", "models": ["default"]},
            {"file": f"{R}/robustness_r17.json", "models": ["ssl"]}]}),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "shipped")
    art = tmp_path / "runs/rx/art/default"
    art.mkdir(parents=True)
    (art / "card.md").write_text("new card\n")
    (art / "encoder.onnx").write_text("new weights")
    (tmp_path / "runs/rx/suite").mkdir()
    (tmp_path / "runs/rx/suite/robustness.json").write_text(json.dumps({"models": [
        {"name": "default", "path": "runs/rx/art/default", "clean": {"acc": 0.666, "exact_acc": 0.701},
         "worst_case": {"acc": 0.302}}]}))
    (tmp_path / "runs/rx/suite/robustness.md").write_text("new report\n")
    (tmp_path / "runs/rx/suite/robustness_eps.png").write_text("new png")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/satml").write_text(STUB)
    (tmp_path / "bin/satml").chmod(0o755)
    return tmp_path


def ship(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{repo / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(["bash", str(SHIP), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def test_a_passing_candidate_replaces_the_default_and_keeps_the_old_report(repo: Path) -> None:
    out = ship(repo, "runs/rx", "r19", "exact=0.70,worst=0.30,clean=0.665")
    assert out.returncode == 0, out.stderr
    assert (repo / f"{R}/robustness_r19.json").read_text() == '{"old": true}'
    assert (repo / f"{R}/robustness_r19.md").read_text() == "old report\n"
    assert (repo / f"{R}/robustness_r19_eps.png").read_text() == "old png"
    assert (repo / f"{R}/robustness_default.json").read_text() == (repo / "runs/rx/suite/robustness.json").read_text()
    assert (repo / f"{R}/robustness_default.md").read_text() == "new report\n"
    assert (repo / f"{R}/robustness_default_eps.png").read_text() == "new png"
    assert (repo / "artifacts/default/encoder.onnx").read_text() == "new weights"
    assert (repo / "artifacts/default/card.md").read_text() == "new card\ncard of the suite\n"
    log = (repo / "log").read_text().splitlines()
    assert log[0] == f"card robustness-card artifacts/default {R}/robustness_default.json"
    assert log[1] == (f"report {R}/robustness_default.json:default {R}/robustness_r17.json:ssl "
                      f"--artifacts artifacts --out {R}")
    staged = set(git(repo, "diff", "--cached", "--name-status", "--no-renames").splitlines())  # staged, not committed
    assert {f"A\t{R}/robustness_r19.md", f"M\t{R}/robustness_default.md", "M\tartifacts/default/encoder.onnx"} <= staged
    assert git(repo, "log", "--oneline").count("\n") == 1


@pytest.mark.parametrize(("args", "setup", "message"), [
    (["r19", "exact=0.71,worst=0.30"], None, "the ship rules fail"),
    (["r19", "exact=0.70"], "large", "over the 15000000-byte artifact limit"),
    (["default", "exact=0.70"], None, "robustness_default.json exists"),
    (["r 19", "exact=0.70"], None, "PREVIOUS must be a plain name"),
    (["r19", "exact=0.70"], "dirty", "uncommitted changes"),
    (["r19", "exact=0.70"], "no suite", "no test suite for this candidate"),
])
def test_a_refused_ship_changes_nothing(repo: Path, args: list[str], setup: str | None, message: str) -> None:
    if setup == "large":
        with open(repo / "runs/rx/art/default/bank.safetensors", "wb") as f:
            f.truncate(15_000_001)
    elif setup == "dirty":
        (repo / f"{R}/robustness_default.md").write_text("edited\n")
    elif setup == "no suite":
        (repo / "runs/rx/suite/robustness.json").unlink()
    before = git(repo, "status", "--porcelain")
    out = ship(repo, "runs/rx", *args)
    assert out.returncode != 0 and message in out.stderr, (out.stdout, out.stderr)
    assert git(repo, "status", "--porcelain") == before and not (repo / "log").exists()
    assert (repo / "artifacts/default/encoder.onnx").read_text() == "old weights"
