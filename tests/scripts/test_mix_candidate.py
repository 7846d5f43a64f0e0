"""scripts/mix_candidate.sh: a finished fine-tune's start and end mixed (r35), in a candidate's layout.

`satml` and `gate_candidate.sh` are stubs that log their arguments (`satml interpolate` itself is
tests/training/test_interpolate.py's): what is checked here is that the start is the fine-tune's own --init, the mix
goes to RUN/robust, the card's description says what was mixed, and a fine-tune that is not there is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.scripts.stubbed import run_stubbed

WHAT = ("Robust cnn8 + k-NN: the teacher widened, 40 ep, then 6 ep of TRADES-AWP (beta 6, PGD-3); served embedding: "
        "48-d PCA of the bank baked into the encoder; no labels in encoder training")


def run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    return run_stubbed(tmp_path, "mix_candidate.sh", ("gate_candidate.sh", "satml"), *args, **env)


def fine_tune(tmp_path: Path, *, final: bool = True, start: bool = True) -> None:
    """runs/ft: a fine-tune's run folder (config naming its init, metrics, exported artifact's manifest)."""
    robust = tmp_path / "runs" / "ft" / "robust"
    robust.mkdir(parents=True)
    (robust / "config.json").write_text(json.dumps({"init": "runs/ft/init/checkpoint.pt", "trades_beta": 6}))
    (robust / "metrics.jsonl").write_text('{"epoch": 0}\n' + ('{"final": true, "val_knn_acc": 0.675}\n' if final
                                                              else ""))
    (robust / "checkpoint.pt").write_bytes(b"end")
    if start:
        (tmp_path / "runs" / "ft" / "init").mkdir()
        (tmp_path / "runs" / "ft" / "init" / "checkpoint.pt").write_bytes(b"start")
    art = tmp_path / "runs" / "ft" / "art" / "default"
    art.mkdir(parents=True)
    (art / "manifest.json").write_text(json.dumps({"description": WHAT}))


def test_stage_one_mixes_the_fine_tunes_own_start_and_end_into_run(tmp_path: Path) -> None:
    fine_tune(tmp_path)
    out, log = run(tmp_path, "runs/rm/", "runs/ft/", "0.4")
    assert out.returncode == 0, out.stderr
    assert log.splitlines() == ["satml interpolate runs/ft/init/checkpoint.pt runs/ft/robust/checkpoint.pt --t 0.4 "
                                "--run-dir runs/rm/robust --data data --no-progress"]


def test_stage_two_gates_with_the_mix_in_the_description(tmp_path: Path) -> None:
    fine_tune(tmp_path)
    out, log = run(tmp_path, "runs/rm", "runs/ft", "0.5", STAGE="2")
    assert out.returncode == 0, out.stderr
    assert log == ("gate_candidate.sh runs/rm Robust cnn8 + k-NN: the teacher widened, 40 ep, then 6 ep of TRADES-AWP "
                   "(beta 6, PGD-3); served weights: the average of that last stage's start and end, (1 - t) * start "
                   "+ t * end at t = 0.5 (WiSE-FT style); served embedding: 48-d PCA of the bank baked into the "
                   "encoder; no labels in encoder training\n")


@pytest.mark.parametrize(("final", "start", "message"), [
    (False, True, "no finished fine-tune"),
    (True, False, "is not on this machine"),
])
def test_refuses_a_fine_tune_that_is_not_finished_or_whose_start_is_gone(tmp_path: Path, final: bool, start: bool,
                                                                         message: str) -> None:
    fine_tune(tmp_path, final=final, start=start)
    out, log = run(tmp_path, "runs/rm", "runs/ft", "0.5")
    assert out.returncode == 2 and message in out.stderr and log == ""


def test_usage(tmp_path: Path) -> None:
    out, _ = run(tmp_path, "runs/rm")
    assert out.returncode == 2 and "usage" in out.stderr
