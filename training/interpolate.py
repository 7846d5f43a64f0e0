"""Weight interpolation between two checkpoints of one model: (1 - t) * A + t * B (WiSE-FT, Wortsman et al. 2022).

Why: a short fine-tune (issue 10's TRADES finishing stage, 6 epochs at lr 0.01) ends in its start's basin, where the
straight line between the two weight sets is a path of good models; a point on it may trade clean accuracy for
robustness better than the fine-tune's own dose does, and costs no training. Two independent runs are usually not in
one basin (benchmarks/results/recipes.md, "Weight soups"): whether a mix is any good is for the validation split to
say, so the command validates what it writes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.artifact import sha256_file
from training.checkpoint import (
    METRICS,
    config_of,
    encoder_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    served_weights,
)
from training.config import resolve_device
from training.data import SplitSpec, load_split
from training.evaluate import validation_figures

log = logging.getLogger(__name__)


def interpolate_state(a: dict[str, Tensor], b: dict[str, Tensor], t: float) -> dict[str, Tensor]:
    """(1 - t) * a + t * b for every floating tensor (BatchNorm's running statistics too, as WiSE-FT does); the
    integer ones (BatchNorm's batch counters) are b's. Both must hold the same keys with the same shapes."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"interpolation weight t must be in [0, 1], got {t}")
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(f"the checkpoints hold different tensors (only in A: {only_a[:3]}, only in B: {only_b[:3]})")
    out: dict[str, Tensor] = {}
    for k, vb in b.items():
        va = a[k]
        if va.shape != vb.shape:
            raise ValueError(f"{k}: shape {tuple(va.shape)} in A, {tuple(vb.shape)} in B")
        out[k] = torch.lerp(va.float(), vb.float(), t).to(vb.dtype) if vb.is_floating_point() else vb.clone()
    return out


def interpolate_checkpoints(a: dict[str, Any], b: dict[str, Any], t: float,
                            provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint serving the mix of A's and B's served (EMA) weights: B's config, classes and step, the mix as
    its `model`, no optimizer or EMA state (it was not trained, so it does not resume), and `interpolated` saying
    what it is. A and B must be one model (same method, encoder, classes)."""
    ca, cb = config_of(a), config_of(b)
    if ca.encoder_config() != cb.encoder_config():
        raise ValueError(f"different encoders: {ca.encoder_config()} and {cb.encoder_config()}")
    if ca.method != cb.method or a.get("classes") != b.get("classes"):
        raise ValueError(f"different models: {ca.method} on {a.get('classes')} and {cb.method} on "
                         f"{b.get('classes')}")
    mix = interpolate_state(served_weights(a), served_weights(b), t)
    keep = ("config", "classes", "num_classes", "step", "elapsed_s", "world_size")
    return {**{k: b[k] for k in keep if k in b}, "model": mix,
            "interpolated": {"t": t, **(provenance or {})}}


def run_interpolation(a_path: str | Path, b_path: str | Path, t: float, run_dir: str | Path, data: str | None = None,
                      device: str = "cpu", eval_robust: int = 0, progress: bool = False) -> dict[str, Any]:
    """Write RUN_DIR/checkpoint.pt (the mix), config.json (B's) and a final record with the mix's validation
    figures on B's validation split (`validation_figures`, as a training run's final record), and return it."""
    a_path, b_path, out = Path(a_path), Path(b_path), Path(run_dir)
    prov = {"a": str(a_path), "b": str(b_path), "a_sha256": sha256_file(a_path), "b_sha256": sha256_file(b_path)}
    ckpt = interpolate_checkpoints(load_checkpoint(a_path), load_checkpoint(b_path), t, prov)
    cfg = config_of(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", ckpt)
    (out / "config.json").write_text(json.dumps(ckpt["config"], indent=2))
    record: dict[str, Any] = {"final": True, "checkpoint": str(out / "checkpoint.pt"), "interpolated": ckpt[
        "interpolated"], "step": ckpt.get("step"), "finished": True}
    train_set, val_set = load_split(data or cfg.data, SplitSpec.from_config(ckpt["config"]))
    if val_set is not None:
        dev = resolve_device(device)
        encoder = encoder_from_checkpoint(ckpt).to(dev).eval()
        record.update(validation_figures(encoder, train_set.images, train_set.labels, len(train_set.classes),
                                         val_set.images, val_set.labels, k=cfg.knn_k, eval_robust=eval_robust,
                                         device=dev, progress=progress))
    else:
        log.warning("no validation split: the mix is written unvalidated")
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def cmd_interpolate(args: argparse.Namespace) -> dict[str, Any]:
    return run_interpolation(args.a, args.b, args.t, args.run_dir, args.data, args.device, args.eval_robust,
                             not args.no_progress)


def add_cli(sub: Any) -> None:
    p = sub.add_parser("interpolate", help="mix two checkpoints of one model, (1 - t) * A + t * B, and validate it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("a", help="checkpoint A (t = 0), e.g. a fine-tune's start")
    p.add_argument("b", help="checkpoint B (t = 1), e.g. the fine-tune's end; the mix keeps its config")
    p.add_argument("--t", type=float, required=True, help="weight of B, in [0, 1]")
    p.add_argument("--run-dir", required=True, help="where the mix's checkpoint.pt, config.json and "
                                                    "metrics.jsonl go (as a training run's)")
    p.add_argument("--data", default=None, help="the dataset B trained on (default: its config's)")
    p.add_argument("--eval-robust", type=int, default=0, help="also PGD-10 on the first N validation images")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_interpolate)
