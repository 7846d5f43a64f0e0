"""`satml calibrate`: add conformal calibration scores to an artifact (issue 14; Deep k-NN style).

The scores are the nonconformity (k - votes for the true label) of the held-out validation split
the artifact was exported with (`training.data.validation_split`, rebuilt from the manifest's
hyper-parameters: CIFAR-10's last 5,000, other data stratified), never the bank nor the test set.
Written as `calibration.safetensors`, listed and hashed in the manifest, so a server verifies it
like every other file; artifacts without it still load and report no credibility.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from training import conformal, knn
from training.artifact import load_artifact, update_artifact
from training.data import SplitSpec, load_dataset, recorded_validation
from training.evaluate import KnnModel
from training.manifest import Calibration, Manifest


@torch.no_grad()
def vote_counts(model: KnnModel, images: Any, batch_size: int = 500) -> torch.Tensor:
    """Hard-vote counts [N, C] of uint8 NHWC images."""
    out = [model.predict_votes(knn.to_float_images(images[i:i + batch_size], model.bank.device))[1].cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def calibrate_artifact(path: str | Path, data: str | Path, n: int | None = None,
                       device: str | torch.device = "cpu") -> dict[str, Any]:
    """Compute, write and hash the calibration scores of the artifact at `path`; returns the manifest entry."""
    path = Path(path)
    art = load_artifact(path, device)
    bank_size = art.spec.bank_images(int(art.bank.shape[0]))
    hp = art.manifest.get("training", {}).get("hyperparameters", {})
    full = load_dataset(data, "train")
    stratified = False
    val = recorded_validation(hp, full, bank_size, f"{path} with {data}")  # the split the run trained with
    if val is not None:
        held, stratified = val, full.kind != "cifar10"
    else:  # hand-made artifacts without a recorded split: the training images after the bank
        held = full.subset(slice(bank_size, None))
    truncated = n is not None and n < len(held)
    if truncated:
        held = held.subset(slice(0, n))  # the stratified split is shuffled: a prefix is a random sample
    where = (SplitSpec.from_config(hp).describe(full) + (f"; its first {len(held)} images" if truncated else "")
             if stratified else
             f"training images {bank_size}..{bank_size + len(held) - 1} (held out of the bank; the validation split)")
    if len(held) == 0:
        raise ValueError(f"{path}: no training images after the bank's {bank_size} to calibrate on "
                         f"({len(full)} in {data})")
    if list(held.classes) != art.classes:
        raise ValueError(f"{path}: dataset classes {held.classes} differ from the artifact's {art.classes}")
    counts = vote_counts(KnnModel.from_artifact(art), held.images)
    labels = torch.as_tensor(held.labels).long()
    scores = conformal.calibration_scores(counts, labels, art.k)
    return write_calibration(path, scores, {
        "n": len(held), "split": where, "clean_accuracy_on_split": float((counts.argmax(1) == labels).float().mean())})


def write_calibration(path: str | Path, scores: torch.Tensor, entry: dict[str, Any]) -> dict[str, Any]:
    """Write `calibration.safetensors`, record `entry` as the manifest's `calibration` and re-hash (atomic)."""
    calibration = Calibration.from_dict(
        {"file": conformal.CALIBRATION, "nonconformity": "k - votes for the label (Deep k-NN)", **entry})

    def record(manifest: Manifest) -> None:
        manifest.calibration = calibration

    update_artifact(path, record, {conformal.CALIBRATION: save({"scores": scores.to(torch.int32).contiguous()})})
    return calibration.to_dict()


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    return {str(a): calibrate_artifact(a, args.data, args.n, args.device) for a in args.artifacts}


def add_cli(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="add conformal calibration scores (credibility, abstention) to artifacts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("artifacts", nargs="+", help="artifact folders")
    p.add_argument("--data", default="data", help="dataset the bank was built from (its held-out split is used)")
    p.add_argument("--n", type=int, default=None, help="at most N held-out images (None: all after the bank)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.set_defaults(func=cmd_calibrate)
