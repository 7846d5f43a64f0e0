"""`torchrun` DDP on the CPU: two gloo processes train one tiny run together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint
from training.train import METRICS


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sat", "supervised"])
def test_torchrun_two_gloo_processes(method: str, tiny_cifar: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / method
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.cli", "train", "--method", method, "--data", str(tiny_cifar), "--run-dir", str(run_dir),
           "--arch", "resnet10", "--width", "4", "--proj-dim", "16", "--epochs", "2", "--batch-size", "16",
           "--val-size", "16", "--eval-every", "1", "--eval-size", "8", "--knn-k", "5", "--attack-steps", "2",
           "--guides", "2", "--device", "cpu", "--workers-threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    # both ranks print their result; every one reports the shared world and the full schedule
    results, text, decoder = [], out.stdout.strip(), json.JSONDecoder()
    while text:
        obj, end = decoder.raw_decode(text)
        results.append(obj)
        text = text[end:].strip()
    assert len(results) == 2, out.stdout
    assert all(r["world_size"] == 2 and r["finished"] and r["step"] == 2 * (64 // 16) for r in results)
    # only rank 0 writes: one metrics line per epoch plus the final record
    lines = [json.loads(x) for x in (run_dir / METRICS).read_text().splitlines()]
    assert [r.get("epoch") for r in lines if "epoch" in r] == [0, 1]
    assert sum(1 for r in lines if r.get("final")) == 1
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 8
    # the checkpoint holds the plain module (no DDP "module." prefix), so it exports like any other run
    assert all(not k.startswith("module.") for k in ckpt["model"])
