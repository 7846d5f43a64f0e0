"""training.pseudo_labels: seeded spherical k-means of a teacher's embedding; pseudo_at runs never see labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training.conftest import TINY_PER_BATCH, synthetic_images
from tests.training.test_data import CLASSES, _py2_pickle, _to_rows
from tests.training.test_train import STEPS, _check_run, tiny_config
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.pseudo_labels import purity, spherical_kmeans
from training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(k: int, per: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(per)
    return centres[labels] + 0.05 * torch.randn(k * per, dim, generator=g), labels


def test_kmeans_recovers_separated_clusters() -> None:
    z, labels = _blobs(5, 40)
    centroids, assign = spherical_kmeans(z, 5, seed=0)
    assert centroids.shape == (5, 8) and torch.allclose(centroids.norm(dim=1), torch.ones(5), atol=1e-5)
    assert purity(assign, labels) == 1.0 and len(assign.unique()) == 5
    again = spherical_kmeans(z, 5, seed=0)[1]
    assert torch.equal(assign, again), "seeded: a resumed run recomputes the same clusters"


def test_kmeans_keeps_every_cluster_alive() -> None:
    """More clusters than blobs: empty clusters are re-seeded, so every id is used."""
    z, _ = _blobs(3, 30)
    _, assign = spherical_kmeans(z, 12, seed=1)
    assert len(assign.unique()) == 12


def test_purity_and_errors() -> None:
    assert purity(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(ValueError, match="k must be"):
        spherical_kmeans(torch.rand(4, 3), 5)


def test_pseudo_at_needs_a_teacher() -> None:
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(method="pseudo_at")
    with pytest.raises(ValueError, match="clusters"):
        TrainConfig(method="pseudo_at", teacher="t.pt", clusters=1)


def _relabelled_cifar(root: Path, shift: int) -> Path:
    """The tiny CIFAR-10 of conftest with the same pixels but every training label shifted by `shift`."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    per = TINY_PER_BATCH
    _py2_pickle({b"num_cases_per_batch": per, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072},
                d / "batches.meta")
    for k, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        labels = np.arange(k * per, (k + 1) * per) % len(CLASSES)
        _py2_pickle({b"batch_label": name.encode(), b"labels": ((labels + shift) % len(CLASSES)).tolist(),
                     b"data": _to_rows(synthetic_images(per, labels, seed=k)),
                     b"filenames": [f"{name}_{i}.png".encode() for i in range(per)]}, d / name)
    return root


@pytest.fixture(scope="module")
def teacher(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg = tiny_config(tiny_cifar, tmp_path_factory.mktemp("teacher"), method="ssl")
    return str(train(cfg)["checkpoint"])


def test_pseudo_at_trains_without_labels(teacher: str, tmp_path: Path) -> None:
    """Same pixels, different labels: bit-identical weights (labels only reach the validation numbers)."""
    ckpts = []
    for shift in (0, 3):
        data = _relabelled_cifar(tmp_path / f"data{shift}", shift)
        cfg = tiny_config(data, tmp_path / f"run{shift}", method="pseudo_at", teacher=teacher,
                          init=teacher, clusters=6, eps=8 / 255, alpha=4 / 255, attack_steps=2)
        ckpt = _check_run(cfg, train(cfg))
        assert ckpt["model"]["head.weight"].shape[0] == 6, "one output per cluster, not per class"
        ckpts.append(load_checkpoint(Path(cfg.run_dir) / "checkpoint.pt")["model"])
    assert ckpts[0].keys() == ckpts[1].keys()
    assert all(torch.equal(ckpts[0][k], ckpts[1][k]) for k in ckpts[0])
    assert STEPS > 0
