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


def chain(tmp_path: Path, gate: str, suite: str, *ship_rules: str, gate_file: str = "robustness.json",
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the chain in `tmp_path` with a stub run script (logs its stages, and at STAGE=2 the fail-fast rule it was
    given; STAGE=2 writes `gate` as the gate's `gate_file`: its report, or a fail-fast gate's stopped.json) and a stub
    `satml robustness` (writes `suite` as the suite's report, logs the call)."""
    script, bin_ = tmp_path / "run.sh", tmp_path / "bin"
    script.write_text("#!/usr/bin/env bash\nset -e\necho \"stage ${STAGE:-1}\" >> log\n"
                      "if [ \"${STAGE:-1}\" = 2 ]; then echo \"stop-below '${GATE_STOP_BELOW-unset}'\" >> log; "
                      f"mkdir -p runs/rx/val_gate; echo '{gate}' > runs/rx/val_gate/{gate_file}; fi\n")
    bin_.mkdir(exist_ok=True)
    (bin_ / "satml").write_text(
        "#!/usr/bin/env bash\n"
        "if [ \"$1\" = robustness ]; then echo \"suite $*\" >> log; mkdir -p runs/rx/suite; "
        f"echo '{suite}' > runs/rx/suite/robustness.json; exit 0; fi\n"
        f"exec {sys.executable} -m training.cli \"$@\"\n")
    (bin_ / "satml").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
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


def test_the_gate_fails_fast_on_its_own_rule_and_a_stop_is_a_fail(tmp_path: Path) -> None:
    """The gate's stage gets the gate's rule as GATE_STOP_BELOW (scripts/gate_candidate.sh stops there); a gate that
    stopped leaves stopped.json, which the verdict reads as a fail, and a rerun of the chain does not gate again."""
    model = json.loads(report(0.25, 0.70, 0.70))["models"][1]
    stopped = json.dumps({"reason": "worst 25.00 % < 28.4 % after apgd_ce", "after": "apgd_ce", "model": model,
                          "figures": {"clean": 0.70, "exact": 0.70, "worst": 0.25}})
    out = chain(tmp_path, stopped, report(0.35, 0.70, 0.71), "exact=0.70", gate_file="stopped.json")
    assert out.returncode == 0, out.stderr
    assert "stopped early (worst 25.00 % < 28.4 % after apgd_ce)" in out.stdout and "gate failed" in out.stdout
    log = (tmp_path / "log").read_text().splitlines()
    assert log == ["stage 1", "stage 2", "stop-below 'worst=0.284,clean=0.678'"]  # and no suite
    (tmp_path / "log").unlink()
    again = chain(tmp_path, report(0.35, 0.70, 0.70), report(0.35, 0.70, 0.71), "exact=0.70")
    assert "gate failed" in again.stdout and (tmp_path / "log").read_text().splitlines() == ["stage 1"]


def test_an_empty_gate_stop_below_runs_the_gate_whole(tmp_path: Path) -> None:
    chain(tmp_path, report(0.30, 0.69, 0.69), report(0.32, 0.67, 0.71), "exact=0.70", env={"GATE_STOP_BELOW": ""})
    assert "stop-below ''" in (tmp_path / "log").read_text()


def test_a_final_training_is_not_run_again(tmp_path: Path) -> None:
    (tmp_path / "runs/rx/robust").mkdir(parents=True)
    (tmp_path / "runs/rx/robust/metrics.jsonl").write_text('{"step": 10}\n{"final": true, "step": 10}\n')
    out = chain(tmp_path, report(0.30, 0.69, 0.69), report(0.32, 0.67, 0.71), "exact=0.70")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "log").read_text().splitlines()[0] == "stage 2"
