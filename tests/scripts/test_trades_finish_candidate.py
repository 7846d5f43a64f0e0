"""scripts/trades_finish_candidate.sh: the TRADES-AWP finishing stage of r31-r33 in a candidate's layout.

`satml`, `candidate_state.sh` and `gate_candidate.sh` are stubs that log their arguments (each is tested on its own;
the real training is tests/scripts/test_train_cpu_default.py's FINISH_TRADES_BETA stage): what is checked here is
that BETA, EPOCHS and EVAL_ROBUST reach the training command and the card's description, from r29's weights."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.scripts.stubbed import run_stubbed


def run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    return run_stubbed(tmp_path, "trades_finish_candidate.sh", ("candidate_state.sh", "gate_candidate.sh", "satml"),
                       *args, **env)


def test_stage_one_restores_r29_and_trains_at_the_given_beta(tmp_path: Path) -> None:
    out, log = run(tmp_path, "runs/rz/", "3", EPOCHS="4")
    assert out.returncode == 0, out.stderr
    restore, train = log.splitlines()
    assert restore == "candidate_state.sh from-git d0ffc72 checkpoints/r29/state/robust runs/rz/r29_init"
    args = train.split()
    assert args[:3] == ["satml", "train", "--method"]
    for flag, value in (("--trades-beta", "3"), ("--epochs", "4"), ("--eval-robust", "500"),
                        ("--run-dir", "runs/rz/robust"), ("--init", "runs/rz/r29_init/checkpoint.pt"),
                        ("--awp-gamma", "0.01"), ("--soft-targets", "0.02"), ("--lr", "0.01")):
        assert args[args.index(flag) + 1] == value, flag


def test_stage_two_gates_with_the_recipe_in_the_description(tmp_path: Path) -> None:
    out, log = run(tmp_path, "runs/rz", "2", STAGE="2")
    assert out.returncode == 0, out.stderr
    assert log.startswith("gate_candidate.sh runs/rz Robust self-supervised cnn8 width 40")
    assert "then 6 ep of TRADES-AWP (beta 2, PGD-3) on the same targets" in log


def test_eval_robust_zero_is_r31s_setting(tmp_path: Path) -> None:
    out, log = run(tmp_path, "runs/r31", "6", EVAL_ROBUST="0")
    assert out.returncode == 0, out.stderr
    args = log.splitlines()[1].split()
    assert args[args.index("--eval-robust") + 1] == "0" and args[args.index("--trades-beta") + 1] == "6"


@pytest.mark.parametrize(("args", "env", "message"), [
    (("runs/rz",), {}, "usage:"),
    (("runs/rz", "2"), {"STAGE": "3"}, "STAGE must be 1 or 2"),
])
def test_refuses_a_wrong_call(tmp_path: Path, args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    out, log = run(tmp_path, *args, **env)
    assert out.returncode == 2 and message in out.stderr and log == ""
