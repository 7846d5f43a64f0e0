"""A toy k-NN problem shared by the evaluation and attack tests: three colour classes, a BatchNorm encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import knn
from training.evaluate import KnnModel

NUM_CLASSES = 3
PALETTE = np.array([[0.3, 0.3, 0.7], [0.7, 0.3, 0.3], [0.3, 0.7, 0.3]])


class ColourEncoder(nn.Module):
    """Mean colour of a small conv's output, L2-normalised: [B, 3, H, W] -> [B, 4]. Has BatchNorm, so
    a wrong train/eval mode changes its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(4, 3).view(4, 3, 1, 1) * 4)
            self.conv.bias.copy_(torch.tensor([-2.0, -2.0, -2.0, 1.0]))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.bn(self.conv(x)).mean((2, 3)), dim=1)


def colour_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 8, 8, 3] images of a class colour plus noise, and int64 labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % NUM_CLASSES
    x = PALETTE[y][:, None, None, :] + rng.uniform(-0.1, 0.1, (n, 8, 8, 3))
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)


def toy_model() -> KnnModel:
    enc = ColourEncoder().eval()
    images, labels = colour_images(60, seed=0)
    bank = knn.embed(enc, images)
    return KnnModel(enc, bank, torch.as_tensor(labels), NUM_CLASSES, k=5)


def toy_data() -> tuple[np.ndarray, np.ndarray]:
    return colour_images(30, seed=1)


@pytest.fixture(scope="module", name="model")
def model_fixture() -> KnnModel:
    """`model`: the toy k-NN model (import this into a test module to use it)."""
    return toy_model()


@pytest.fixture(scope="module", name="data")
def data_fixture() -> tuple[np.ndarray, np.ndarray]:
    """`data`: 30 held-out toy images and labels."""
    return toy_data()
