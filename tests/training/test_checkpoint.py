"""Checkpoint IO: an exported artifact directory stands in for a checkpoint as `--teacher` / `--init`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from training.artifact import ArtifactError, load_artifact
from training.checkpoint import config_of, encoder_from_checkpoint, load_weights_source
from training.config import TrainConfig
from training.train import build_model, init_from


def test_artifact_dir_loads_as_the_encoder_it_serves(tiny_artifact: Path) -> None:
    ckpt = load_weights_source(tiny_artifact)
    served = load_artifact(tiny_artifact).encoder
    rebuilt = encoder_from_checkpoint(ckpt).eval()
    assert config_of(ckpt).encoder_config().embed_dim == served.cfg.embed_dim
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), served(x))


def test_init_from_an_artifact_copies_its_encoder(tiny_artifact: Path) -> None:
    cfg = TrainConfig(method="pgd_at", arch="resnet10", width=4, proj_dim=16)
    model = build_model(cfg, num_classes=10)
    init_from(model, str(tiny_artifact))
    served = load_artifact(tiny_artifact).encoder.state_dict()
    assert all(torch.equal(v, served[k.removeprefix("encoder.")])
               for k, v in model.state_dict().items() if k.startswith("encoder."))


def test_a_tampered_artifact_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    weights = bad / "encoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        load_weights_source(bad)
