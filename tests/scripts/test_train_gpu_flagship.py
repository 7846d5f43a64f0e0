"""scripts/train_gpu_flagship.sh, the GPU flagship recipe, run tiny on the CPU (issue 10: the same code as the CPU
default, only sizes change; keep it runnable without a GPU).

Each call runs one stage and exits 0, so a device lease of 10-minute commands reruns it until "all done"; the
stages are the CPU default's (SimCLR teacher -> label-free pseudo_at) plus the labelled baselines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import write_tiny_cifar
from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_gpu_flagship.sh"


@pytest.mark.timeout(600)  # ~30 s on an idle 2-core machine
def test_flagship_runs_stage_by_stage_until_all_done(tmp_path: Path) -> None:
    data = write_tiny_cifar(tmp_path / "data")
    runs = tmp_path / "runs"
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this venv's satml
           "DATA": str(data), "RUNS": str(runs), "DEVICE": "cpu", "WIDTH": "4", "BATCH": "16",
           "TEACHER_EPOCHS": "1", "ROBUST_EPOCHS": "1", "BASELINE_EPOCHS": "1", "ATTACK_STEPS": "1",
           "BASELINES": "1", "OMP_NUM_THREADS": "1",
           "TRAIN_ARGS": "--proj-dim 16 --val-size 16 --eval-size 16 --eval-robust 4 --clusters 4"}
    stages, outputs = ["teacher", "robust", "pgd_at", "supervised"], []
    for done in range(len(stages) + 1):
        call = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert call.returncode == 0, call.stderr[-3000:]
        outputs.append(call.stdout)
        made = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
        assert made == sorted(stages[:done + 1] if done < len(stages) else stages), "one stage per call"
    assert "all done" in outputs[-1] and not any("all done" in o for o in outputs[:-1])
    methods = {}
    for stage in stages:
        lines = (runs / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1]).get("final") is True
        cfg = load_checkpoint(runs / stage / "checkpoint.pt")["config"]
        assert cfg["arch"] == "resnet18" and cfg["width"] == 4 and cfg["precision"] == "bf16"
        methods[stage] = cfg["method"]
    assert methods == {"teacher": "ssl", "robust": "pseudo_at", "pgd_at": "pgd_at", "supervised": "supervised"}
    robust = load_checkpoint(runs / "robust" / "checkpoint.pt")["config"]
    assert robust["teacher"] == str(runs / "teacher" / "checkpoint.pt") and robust["clusters"] == 4
    assert robust["attack_steps"] == 1 and abs(robust["alpha"] - 0.0313725) < 1e-9  # 2.5 * eps / steps, <= eps
