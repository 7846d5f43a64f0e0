"""`satml calibrate`: scores from the held-out split, hashed in the manifest, loaded with the artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import conformal
from training.artifact import MANIFEST, ArtifactError, load_artifact, verify_artifact
from training.calibrate import calibrate_artifact, vote_counts
from training.cli import main
from training.data import load_dataset
from training.evaluate import KnnModel


def test_artifact_without_calibration_loads_without_it(tiny_artifact: Path) -> None:
    assert load_artifact(tiny_artifact).calibration is None


def test_calibrate_uses_the_held_out_split_and_is_verified(tiny_artifact: Path, tiny_cifar: Path) -> None:
    entry = calibrate_artifact(tiny_artifact, tiny_cifar)
    manifest = verify_artifact(tiny_artifact)
    assert conformal.CALIBRATION in manifest.files and manifest.calibration is not None
    assert manifest.calibration.to_dict() == entry
    assert entry["n"] == 16 and "64..79" in entry["split"]  # the 16 training images after the 64-image bank
    art = load_artifact(tiny_artifact)
    assert art.calibration is not None and art.calibration.shape == (16,)
    assert torch.equal(art.calibration, art.calibration.sort().values)
    # the scores are k - votes for the true label of exactly those images
    held = load_dataset(str(tiny_cifar), "train").subset(slice(64, 80))
    counts = vote_counts(KnnModel.from_artifact(art), held.images)
    expected = (art.k - counts.gather(1, torch.as_tensor(held.labels).long()[:, None]).squeeze(1)).sort().values
    assert torch.equal(art.calibration, expected)


def test_tampered_calibration_is_refused(tiny_artifact: Path, tiny_cifar: Path) -> None:
    calibrate_artifact(tiny_artifact, tiny_cifar)
    with (tiny_artifact / conformal.CALIBRATION).open("r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x07\x07")
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tiny_artifact)


def test_cli_calibrate(tiny_artifact: Path, tiny_cifar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tiny_artifact), "--data", str(tiny_cifar), "--n", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[str(tiny_artifact)]["n"] == 8
    assert json.loads((tiny_artifact / MANIFEST).read_text())["calibration"]["n"] == 8
    assert main(["calibrate", str(tiny_artifact), "--data", str(tiny_cifar / "missing")]) == 2
