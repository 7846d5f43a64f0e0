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
from training.pseudo_labels import RECORD, check_or_record, purity, spherical_kmeans
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


@pytest.mark.parametrize("soft", [0.0, 0.1], ids=["hard", "soft"])
def test_pseudo_at_trains_without_labels(teacher: str, tmp_path: Path, soft: float) -> None:
    """Same pixels, different labels: bit-identical weights (labels only reach the validation numbers), with the
    hard cluster ids and with the teacher's soft assignment as targets."""
    ckpts = []
    for shift in (0, 3):
        data = _relabelled_cifar(tmp_path / f"data{shift}", shift)
        cfg = tiny_config(data, tmp_path / f"run{shift}", method="pseudo_at", teacher=teacher,
                          init=teacher, clusters=6, eps=8 / 255, alpha=4 / 255, attack_steps=2, soft_targets=soft)
        ckpt = _check_run(cfg, train(cfg))
        assert ckpt["model"]["head.weight"].shape[0] == 6, "one output per cluster, not per class"
        assert ckpt["config"]["soft_targets"] == soft
        ckpts.append(load_checkpoint(Path(cfg.run_dir) / "checkpoint.pt")["model"])
    assert ckpts[0].keys() == ckpts[1].keys()
    assert all(torch.equal(ckpts[0][k], ckpts[1][k]) for k in ckpts[0])
    assert STEPS > 0


def test_soft_assignment_is_a_distribution_whose_argmax_is_the_cluster() -> None:
    from training.pseudo_labels import soft_assignment

    z = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    centroids, assign = spherical_kmeans(z, 6, seed=0)
    warm, cold = soft_assignment(z, centroids, 0.5), soft_assignment(z, centroids, 0.01)
    for p in (warm, cold):
        assert p.shape == (300, 6) and torch.allclose(p.sum(1), torch.ones(300), atol=1e-5) and (p >= 0).all()
        assert torch.equal(p.argmax(1), assign), "the soft target's argmax is the hard k-means id"
    assert cold.max(1).values.mean() > 0.95 > warm.max(1).values.mean(), "lower temperature: closer to one-hot"
    with pytest.raises(ValueError, match="temperature"):
        soft_assignment(z, centroids, 0.0)


def test_soft_targets_only_for_pseudo_at() -> None:
    with pytest.raises(ValueError, match="soft_targets"):
        TrainConfig(method="pgd_at", soft_targets=0.1)
    with pytest.raises(ValueError, match="soft_targets"):
        TrainConfig(method="pseudo_at", teacher="t.pt", soft_targets=-1)
    assert TrainConfig(method="pseudo_at", teacher="t.pt", soft_targets=0.1).soft_targets == 0.1


def test_soft_targets_reach_the_loss(teacher: str, tiny_cifar: Path, tmp_path: Path, caplog) -> None:
    """The same run with the hard ids and with the soft assignment ends at different weights (the flag is used)."""
    weights = []
    for soft in (0.0, 0.1):
        cfg = tiny_config(tiny_cifar, tmp_path / f"run{soft}", method="pseudo_at", teacher=teacher, init=teacher,
                          clusters=6, eps=8 / 255, alpha=4 / 255, attack_steps=2, soft_targets=soft)
        with caplog.at_level("INFO", logger="training.train"):
            train(cfg)
        weights.append(load_checkpoint(Path(cfg.run_dir) / "checkpoint.pt")["model"]["head.weight"])
    assert not torch.equal(weights[0], weights[1])
    assert "soft targets at T=0.1, mean top share" in caplog.text


def test_cluster_record_is_kept_by_a_resumed_run_and_refuses_other_clusters(tmp_path: Path) -> None:
    path, ids = tmp_path / RECORD, torch.arange(2000) % 7
    assert check_or_record(path, ids, resuming=False) == 1.0 and path.is_file()
    assert check_or_record(path, ids, resuming=True) == 1.0
    flipped = ids.clone()
    flipped[:2] = 6 - flipped[:2]  # a boundary image or two (another CPU's float sums): 0.1 % allowed
    assert check_or_record(path, flipped, resuming=True) == pytest.approx(1 - 2 / 2000)
    with pytest.raises(ValueError, match="agree with those the run started with on only"):
        check_or_record(path, (ids + 1) % 7, resuming=True)  # the same clusters, numbered otherwise
    with pytest.raises(ValueError, match="not the same data"):
        check_or_record(path, ids[:1000], resuming=True)
    assert check_or_record(path, (ids + 1) % 7, resuming=False) == 1.0, "a fresh start records its own"
    assert torch.equal(torch.from_numpy(np.load(path)).long(), (ids + 1) % 7)
    other = tmp_path / "other.npy"
    assert check_or_record(other, ids, resuming=True, write=False) == 1.0 and not other.exists(), \
        "a resumed run without a record (started before records existed) records, on the main rank only"


def test_a_resumed_pseudo_at_run_refuses_changed_clusters(teacher: str, tiny_cifar: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_cifar, tmp_path / "run", method="pseudo_at", teacher=teacher, init=teacher, clusters=6,
                      eps=8 / 255, alpha=4 / 255, attack_steps=2)
    train(cfg)
    record = Path(cfg.run_dir) / RECORD
    ids = np.load(record)
    assert ids.shape == (len(ids),) and set(np.unique(ids)) <= set(range(6))
    np.save(record, (ids + 1) % 6)  # as if the teacher's k-means had come out numbered otherwise
    with pytest.raises(ValueError, match="resuming would change the targets"):
        train(cfg)
