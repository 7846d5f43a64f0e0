"""Shared fixtures for the training tests: a tiny CIFAR-10 in the official layout, tiny encoders.

The pickles are written by the same Python-2-style writer as `test_data.py` (imported, not copied),
so the training tests read exactly what the loader tests prove the official format to be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.test_data import CLASSES, _py2_pickle, _to_rows
from training.models import Encoder, EncoderConfig

TINY_PER_BATCH = 16  # 5 x 16 = 80 training images, 16 test images
TINY_ENCODER = {"arch": "resnet10", "width": 4, "proj_dim": 16}  # embedding dim 32, ~20k parameters


def synthetic_images(n: int, labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [n, 32, 32, 3]: a class-dependent colour plus noise, so k-NN has something to find."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(30, 226, (len(CLASSES), 3))
    base = palette[labels][:, None, None, :]
    return np.clip(base + rng.integers(-30, 31, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def write_tiny_cifar(root: Path, per_batch: int = TINY_PER_BATCH) -> Path:
    """Write root/cifar-10-batches-py/ (5 training batches + test_batch) and return root."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    _py2_pickle({b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CLASSES],
                 b"num_vis": 3072}, d / "batches.meta")
    for k, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        labels = np.arange(k * per_batch, (k + 1) * per_batch) % len(CLASSES)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": _to_rows(synthetic_images(per_batch, labels, seed=k)),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        _py2_pickle(batch, d / name)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread skips the thread hand-off that dominates on a busy 2-core machine.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny CIFAR-10 folder shared by the whole session (never write into it)."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture
def tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(**TINY_ENCODER)).eval()


@pytest.fixture
def tiny_artifact(tiny_cifar: Path, tmp_path: Path) -> Path:
    """A resnet10-width-4 artifact over the first 64 of the tiny training images (16 held out)."""
    from training import knn
    from training.data import load_dataset
    from training.export import export_artifact

    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(arch="resnet10", width=4, proj_dim=16)).eval()
    train = load_dataset(str(tiny_cifar), "train")
    bank = knn.embed(encoder, train.images[:64])
    training = {"method": "ssl", "hyperparameters": {}, "epochs": 0, "seed": 0, "code_version": "test"}
    return export_artifact(tmp_path / "art", encoder, bank, torch.as_tensor(train.labels[:64]), name="tiny",
                           classes=list(train.classes), dataset="cifar10", training=training, k=5, onnx=False)
