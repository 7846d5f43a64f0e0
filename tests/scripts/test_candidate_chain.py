"""scripts/candidate_chain.sh: a candidate's steps in order, each skipped once done, and its pre-set verdicts.

The training and gate steps are a stub run script here (they are `train_cpu_default.sh` and `gate_candidate.sh`,
tested on their own), and `satml robustness` (an hour of attacks in the real chain) is a stub that writes a fixed
report; `satml robustness-verdict`, the logic under test, is the real command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAIN = ROOT / "scripts" / "candidate_chain.sh"


def report(worst: float, clean: float, exact: float) -> str:
    rows = [{"name": "default (default)", "path": "artifacts/default",
             "clean": {"acc": 0.668, "exact_acc": 0.684}, "worst_case": {"acc": 0.289}},
            {"name": "default (default)", "path": "runs/rx/art/default",
             "clean": {"acc": clean, "exact_acc": exact}, "worst_case": {"acc": worst}}]
    return json.dumps({"models": rows})


def chain(tmp_path: Path, gate: str, suite: str, *ship_rules: str) -> subprocess.CompletedProcess[str]:
    """Run the chain in `tmp_path` with a stub run script (logs its stages; STAGE=2 writes `gate` as the gate's
    report) and a stub `satml robustness` (writes `suite` as the suite's report, logs the call)."""
    script, bin_ = tmp_path / "run.sh", tmp_path / "bin"
    script.write_text("#!/usr/bin/env bash\nset -e\necho \"stage ${STAGE:-1}\" >> log\n"
                      "if [ \"${STAGE:-1}\" = 2 ]; then mkdir -p runs/rx/val_gate; "
                      f"echo '{gate}' > runs/rx/val_gate/robustness.json; fi\n")
    bin_.mkdir(exist_ok=True)
    (bin_ / "satml").write_text(
        "#!/usr/bin/env bash\n"
        "if [ \"$1\" = robustness ]; then echo \"suite $*\" >> log; mkdir -p runs/rx/suite; "
        f"echo '{suite}' > runs/rx/suite/robustness.json; exit 0; fi\n"
        f"exec {sys.executable} -m training.cli \"$@\"\n")
    (bin_ / "satml").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(["bash", str(CHAIN), str(script), "runs/rx", "worst=0.284,clean=0.678", *ship_rules],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("gate", "suite", "rules", "expect", "suite_ran"), [
    (report(0.283, 0.70, 0.70), report(0.35, 0.70, 0.71), ["exact=0.70,worst=0.30"], "gate failed", False),
    (report(0.284, 0.678, 0.678), report(0.301, 0.666, 0.70), ["exact=0.70,worst=0.30,clean=0.665"], "PASSES", True),
    (report(0.30, 0.69, 0.69), report(0.301, 0.666, 0.699), ["exact=0.70,worst=0.30"], "not shipped", True),
    (report(0.30, 0.69, 0.69), report(0.32, 0.666, 0.69), ["exact=0.70", "worst=0.319,clean=0.66"], "PASSES", True),
])
def test_the_chain_gates_then_runs_the_suite_then_judges(tmp_path: Path, gate: str, suite: str, rules: list[str],
                                                         expect: str, suite_ran: bool) -> None:
    out = chain(tmp_path, gate, suite, *rules)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout, out.stdout
    log = (tmp_path / "log").read_text().splitlines()
    assert log[:2] == ["stage 1", "stage 2"]
    suite_lines = [ln for ln in log if ln.startswith("suite ")]
    assert suite_lines == (["suite robustness runs/rx/art/default --data data --transfer-source artifacts/supervised "
                            "--out runs/rx/suite --no-progress"] if suite_ran else [])


def test_a_finished_gate_is_not_run_again(tmp_path: Path) -> None:
    chain(tmp_path, report(0.30, 0.69, 0.69), report(0.32, 0.67, 0.71), "exact=0.70")
    (tmp_path / "log").unlink()
    out = chain(tmp_path, report(0.0, 0.0, 0.0), report(0.32, 0.67, 0.71), "exact=0.70")  # a gate rerun would fail
    assert "PASSES" in out.stdout and (tmp_path / "log").read_text().splitlines()[0] == "stage 1"
    assert "stage 2" not in (tmp_path / "log").read_text()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(CHAIN), "run.sh", "runs/rx"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_a_state_saved_beside_the_run_script_is_restored_before_the_steps(tmp_path: Path) -> None:
    """`state/` beside the run script (scripts/candidate_state.sh save) goes back into the run first: here a finished
    gate's report, so the gate is not run again; a file the machine already has is kept."""
    state = tmp_path / "state"
    (state / "val_gate").mkdir(parents=True)
    (state / "val_gate/robustness.json").write_text(report(0.30, 0.69, 0.69))
    (state / "robust").mkdir()
    (state / "robust/metrics.jsonl").write_text("saved\n")
    (tmp_path / "runs/rx/robust").mkdir(parents=True)
    (tmp_path / "runs/rx/robust/metrics.jsonl").write_text("this machine's\n")
    out = chain(tmp_path, report(0.0, 0.0, 0.0), report(0.32, 0.67, 0.71), "exact=0.70")  # a gate rerun would fail
    assert out.returncode == 0, out.stderr
    assert "PASSES" in out.stdout, out.stdout
    assert "stage 2" not in (tmp_path / "log").read_text()
    assert (tmp_path / "runs/rx/robust/metrics.jsonl").read_text() == "this machine's\n"
