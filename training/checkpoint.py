"""Checkpoint IO: the `checkpoint.pt` format a training run writes, resumes from, and export reads.

A checkpoint holds only tensors and plain types (so it loads with `weights_only=True`, never unpickling
code) and describes itself: the full `TrainConfig` as a dict, the step, the class names. `--teacher` and
`--init` also take an exported artifact directory (`load_weights_source`), so a shipped model can seed a run
without its training checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from training.artifact import ENCODER_WEIGHTS, verify_artifact
from training.config import METHODS, Method, TrainConfig
from training.models import Encoder

CHECKPOINT = "checkpoint.pt"  # inside a run_dir
METRICS = "metrics.jsonl"  # a run_dir's records, one JSON line each (the last: `final`)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Checkpoints hold only tensors and plain types, so they load with weights_only=True."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_weights_source(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A run's checkpoint.pt, or an exported artifact directory seen as one: its verified manifest gives the
    encoder's shape, its safetensors the served encoder weights (no heads, no optimizer state), under the
    checkpoint's `model` keys. What `--teacher` and `--init` read."""
    p = Path(path)
    if not p.is_dir():
        return load_checkpoint(p, map_location)
    manifest = verify_artifact(p)  # hashes checked: a tampered or half-copied artifact is refused here
    enc, method = manifest.encoder, manifest.training.method if manifest.training else "ssl"
    cfg = TrainConfig(method=cast(Method, method) if method in METHODS else "ssl", arch=enc.arch, width=enc.width,
                      proj_dim=enc.proj_dim, teacher="-")  # teacher: only so distill/pseudo_at configs validate
    weights = load_file(p / ENCODER_WEIGHTS, device=str(map_location))
    return {"config": {**asdict(cfg), "teacher": None}, "model": {f"encoder.{k}": v for k, v in weights.items()},
            "classes": list(manifest.classes), "artifact": str(p)}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def training_state(*, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                   generator: torch.Generator, elapsed_s: float, classes: list[str], world_size: int,
                   ema: nn.Module | None = None) -> dict[str, Any]:
    """Everything a run needs to resume bit for bit, and export needs to rebuild the encoder."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": asdict(cfg),
        "generator": generator.get_state(), "elapsed_s": elapsed_s,
        "num_classes": len(classes), "classes": list(classes), "world_size": world_size,
        **({"ema": ema.state_dict()} if ema is not None else {}),
    }


def config_of(ckpt: dict[str, Any]) -> TrainConfig:
    """The run's config; keys older or newer code does not know are dropped, missing ones take defaults."""
    return TrainConfig.from_dict(ckpt["config"])


def served_weights(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    """The weights the run validated with and export serves: the weight average when it kept one."""
    return ckpt.get("ema") or ckpt["model"]


def encoder_from_checkpoint(ckpt: dict[str, Any]) -> Encoder:
    """Rebuild the encoder of any method's checkpoint (drops projection/linear heads).

    A run trained with `ema_decay` serves its weight average, the weights its validation used."""
    enc = Encoder(config_of(ckpt).encoder_config())
    prefix = "encoder."
    enc.load_state_dict({k[len(prefix):]: v for k, v in served_weights(ckpt).items() if k.startswith(prefix)})
    return enc
