"""scripts/train_cpu_default.sh, the one command behind the shipped default (issue 10), on a tiny CIFAR-10.

The real recipe (SimCLR teacher -> label-free pseudo_at -> export, calibrate, adaptive suite, cards) runs
end to end with its flags shrunk through TRAIN_ARGS / EXPORT_ARGS / SUITE_ARGS, and a second run resumes:
finished steps are skipped, so the trained weights are not touched again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import write_tiny_cifar
from training.artifact import load_artifact, verify_artifact
from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_cpu_default.sh"


def run_script(tmp_path: Path, data: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this venv's satml
           "RUNS": str(tmp_path / "runs"), "DATA": str(data), "ART": str(tmp_path / "art"),
           "TEACHER_EPOCHS": "1", "ROBUST_EPOCHS": "1", "OMP_NUM_THREADS": "1", "TEACHER_WIDTH": "4", "WIDTH": "4",
           "REDUCE_DIM": "",
           "TRAIN_ARGS": "--proj-dim 16 --batch-size 16 --val-size 16 --clusters 4 --eval-robust 4 "
                         "--eval-size 16 --attack-steps 1",
           "EXPORT_ARGS": "--val-size 16 --k 5 --n-robust 4 --steps 2",
           "SUITE_ARGS": f"--quick --out {tmp_path / 'suite'} --device cpu", **overrides}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)  # four runs: 2 min 7 s beside a training job (2-core VM)
def test_the_default_recipe_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    data = write_tiny_cifar(tmp_path / "data")
    first = run_script(tmp_path, data)
    assert first.returncode == 0, first.stderr[-3000:]
    default, ssl = tmp_path / "art" / "default", tmp_path / "art" / "ssl"
    for art in (default, ssl):
        m = verify_artifact(art)  # every file hashed in the manifest, the card included after --update-cards
        assert m.bank_size == 64 and m.knn.k == 5 and m.calibration is not None
        assert "## Robustness (evaluation suite)" in (art / "card.md").read_text()
    assert verify_artifact(default).training.method == "pseudo_at"  # label-free robust stage, from the teacher
    assert verify_artifact(ssl).training.method == "ssl"
    assert verify_artifact(default).encoder.width == 4 and load_artifact(default).bank.shape[0] == 64
    assert "cnn8 width 4 " in verify_artifact(default).description  # WIDTH reaches the card's recipe line
    report = json.loads((tmp_path / "suite" / "robustness.json").read_text())
    assert [m["name"] for m in report["models"]] == ["default", "ssl"]  # no supervised artifact: no transfer row
    # the defaults are r34's recipe: N-FGSM with soft targets and AWP, then 6 epochs of TRADES-AWP at beta 3 served
    robust = load_checkpoint(tmp_path / "runs" / "robust" / "checkpoint.pt")["config"]
    assert robust["train_attack"] == "nfgsm" and robust["co_guard"] == 0.05 and robust["trades_beta"] == 0.0
    assert robust["soft_targets"] == 0.02 and robust["awp_gamma"] == 0.01 and robust["epochs"] == 1
    finish = load_checkpoint(tmp_path / "runs" / "finish" / "checkpoint.pt")["config"]
    assert finish["trades_beta"] == 3.0 and finish["epochs"] == 6 and finish["train_attack"] == "pgd"
    assert finish["soft_targets"] == 0.02 and finish["awp_gamma"] == 0.01
    assert verify_artifact(default).training.hyperparameters["trades_beta"] == 3.0  # the finishing stage is served
    assert ("label-free PGD-AT (N-FGSM at 8/255, EMA, AWP gamma 0.01) on 100 k-means clusters of the teacher's "
            "embedding (soft assignment at T=0.02), 1 ep, then 6 ep of TRADES-AWP (beta 3, PGD-3) on the same "
            "targets") in verify_artifact(default).description

    weights = (tmp_path / "runs" / "robust" / "checkpoint.pt").read_bytes()
    second = run_script(tmp_path, data)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "runs" / "robust" / "checkpoint.pt").read_bytes() == weights  # finished: not retrained
    assert "training.train: epoch" not in second.stderr

    # TEACHER=<an existing teacher artifact>: no teacher stage and no ssl export; the robust stage starts from
    # it, widened (Net2WiderNet) to a WIDTH wider than the teacher's, and REDUCE_DIM serves a PCA of its embedding;
    # BASELINES=1 adds the labelled references on the same encoder: PGD-AT, and cross-entropy as the transfer source
    third = run_script(tmp_path, data, TEACHER=str(ssl), WIDTH="8", REDUCE_DIM="16", RUNS=str(tmp_path / "runs2"),
                       ART=str(tmp_path / "art2"), BASELINES="1", PGD_AT_EPOCHS="1", SUPERVISED_EPOCHS="1",
                       SOFT_TARGETS="0.1", AWP_GAMMA="0.01", TRAIN_ATTACK="nfgsm", CO_GUARD="0.9",
                       FINISH_TRADES_BETA="2", FINISH_EPOCHS="1", FINISH_MIX="0.5")
    assert third.returncode == 0, third.stderr[-3000:]
    assert not (tmp_path / "runs2" / "teacher").exists() and not (tmp_path / "art2" / "ssl").exists()
    wide = verify_artifact(tmp_path / "art2" / "default")
    assert wide.training.method == "pseudo_at" and wide.encoder.width == 8
    assert wide.encoder.reduce_dim == 16 and load_artifact(tmp_path / "art2" / "default").bank.shape == (64, 16)
    assert "16-d PCA of the bank" in wide.description
    assert f"the given teacher ({ssl})" in wide.description
    assert "(soft assignment at T=0.1)" in wide.description
    assert "AWP gamma 0.01" in wide.description and "N-FGSM at 8/255" in wide.description
    robust_cfg = load_checkpoint(tmp_path / "runs2" / "robust" / "checkpoint.pt")["config"]
    assert robust_cfg["soft_targets"] == 0.1 and robust_cfg["awp_gamma"] == 0.01
    assert robust_cfg["train_attack"] == "nfgsm" and robust_cfg["co_guard"] == 0.9
    assert robust_cfg["precision"] == "auto"  # PRECISION unset: bf16 only where the CPU runs it natively
    assert "widened cnn8 width 4 -> 8" in third.stderr
    # FINISH_TRADES_BETA: a TRADES-AWP stage from the robust stage's weights, on its targets; the default serves it
    finish = load_checkpoint(tmp_path / "runs2" / "finish" / "checkpoint.pt")["config"]
    assert finish["init"] == str(tmp_path / "runs2" / "robust" / "checkpoint.pt") and finish["epochs"] == 1
    assert finish["trades_beta"] == 2.0 and finish["lr"] == 0.01 and finish["warmup_epochs"] == 0.0
    assert finish["soft_targets"] == 0.1 and finish["awp_gamma"] == 0.01 and finish["train_attack"] == "pgd"
    assert wide.training.hyperparameters is not None and wide.training.hyperparameters["trades_beta"] == 2.0
    assert "1 ep, then 1 ep of TRADES-AWP (beta 2, PGD-3) on the same targets" in wide.description
    # FINISH_MIX: the default serves the finishing stage's start and end mixed, and says so
    mixed = wide.training.hyperparameters["interpolated"]
    assert mixed["t"] == 0.5 and mixed["a"] == str(tmp_path / "runs2" / "robust" / "checkpoint.pt")
    assert mixed["b"] == str(tmp_path / "runs2" / "finish" / "checkpoint.pt")
    assert "; served weights: the average of that last stage's start and end, (1 - t) * start + t * end at t = 0.5" \
        in wide.description
    for name, method in (("pgd_at", "pgd_at"), ("supervised", "supervised")):
        base = verify_artifact(tmp_path / "art2" / name)
        assert base.training.method == method and base.calibration is not None
        assert base.encoder.arch == "cnn8" and base.encoder.width == 8 and base.encoder.reduce_dim == 16
    assert "Supervised cross-entropy cnn8 width 8" in verify_artifact(tmp_path / "art2" / "supervised").description
    report = json.loads((tmp_path / "suite" / "robustness.json").read_text())
    assert [m["name"] for m in report["models"]] == ["default", "pgd_at", "supervised"]
    assert report["transfer_source"]["name"] == "supervised"

    # TRADES_BETA: the robust stage as TRADES (here with TRADES-AWP), named so in the card's recipe line
    fourth = run_script(tmp_path, data, TEACHER=str(ssl), RUNS=str(tmp_path / "runs3"), ART=str(tmp_path / "art3"),
                        SOFT_TARGETS="0.1", TRADES_BETA="6", AWP_GAMMA="0.005")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    trades_cfg = load_checkpoint(tmp_path / "runs3" / "robust" / "checkpoint.pt")["config"]
    assert trades_cfg["trades_beta"] == 6.0 and trades_cfg["awp_gamma"] == 0.005
    assert trades_cfg["soft_targets"] == 0.1 and trades_cfg["train_attack"] == "pgd"
    assert "label-free TRADES at beta 6 (PGD-3 at 8/255, EMA, AWP gamma 0.005)" in verify_artifact(
        tmp_path / "art3" / "default").description
