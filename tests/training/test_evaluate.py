"""training.evaluate: the k-NN model, named attacks (`craft`, used by the API), accuracy helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import attacks, knn
from training.evaluate import (
    ATTACK_METHODS,
    KnnModel,
    clean_accuracy,
    craft,
    guided_attack,
    pgd_accuracy,
    predictions,
    robust_mask,
)

NUM_CLASSES = 3
PALETTE = np.array([[0.3, 0.3, 0.7], [0.7, 0.3, 0.3], [0.3, 0.7, 0.3]])


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.fixture(scope="module")
def model() -> KnnModel:
    enc = ColourEncoder().eval()
    images, labels = colour_images(60, seed=0)
    bank = knn.embed(enc, images)
    return KnnModel(enc, bank, torch.as_tensor(labels), NUM_CLASSES, k=5)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return colour_images(30, seed=1)


def test_predict_and_votes(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    x = knn.to_float_images(images)
    pred, counts = model.predict_votes(x)
    assert torch.equal(pred, model.predict(x))
    assert counts.shape == (len(x), NUM_CLASSES) and (counts.sum(1) == model.k).all()
    assert (pred.numpy() == labels).all(), "the colour problem is easy when clean"
    assert (predictions(model, images, batch_size=7) == labels).all()
    assert clean_accuracy(model, images, labels, batch_size=7) == 1.0
    assert not model.fooled(torch.as_tensor(labels))(x).any()


def test_pgd_accuracy_api_unchanged(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    small = pgd_accuracy(model, images, labels, eps=1 / 255, steps=3)
    large = pgd_accuracy(model, images, labels, eps=0.5, alpha=0.1, steps=10)
    assert 0 <= large <= small <= 1
    assert large < 0.2, "at eps 0.5 any colour is reachable"


@pytest.mark.parametrize("method", ATTACK_METHODS)
@pytest.mark.parametrize("targeted", [False, True])
def test_craft_contract(method: str, targeted: bool, model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    x = knn.to_float_images(images[:12])
    y = torch.as_tensor(labels[:12])
    target = (y + 1) % NUM_CLASSES if targeted else None
    eps = 16 / 255
    model.encoder.train()
    try:
        x_adv = craft(model, x, y, method=method, eps=eps, steps=5, target=target,
                      generator=torch.Generator().manual_seed(0))
        assert model.encoder.training, "the encoder's mode must be restored"
    finally:
        model.encoder.eval()
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.encoder.parameters())


def test_craft_rejects_unknown_method(model: KnnModel) -> None:
    with pytest.raises(ValueError, match="unknown attack method"):
        craft(model, torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), method="bogus")


def test_craft_knn_pgd_is_the_guided_attack(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    """Backward compatibility: craft's knn_pgd = guided_attack with craft's step rule."""
    images, labels = data
    x, y = knn.to_float_images(images[:9]), torch.as_tensor(labels[:9])
    a = craft(model, x, y, method="knn_pgd", eps=8 / 255, steps=4, guides=7,
              generator=torch.Generator().manual_seed(1))
    b = guided_attack(model, x, y, eps=8 / 255, alpha=max(8 / 255 / 4, 2.5 * (8 / 255) / 4), steps=4, guides=7,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_guided_attack_pulls_toward_other_classes(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    x, y = knn.to_float_images(images), torch.as_tensor(labels)
    guides = model.guides(x, y, 5)  # B x 5 x D
    assert guides.shape == (len(x), 5, model.bank.shape[1])
    objective = attacks.guided_objective(model.encoder, guides)
    x_adv = guided_attack(model, x, y, eps=0.2, alpha=0.05, steps=10, guides=5,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert objective(x_adv).mean() > objective(x).mean()
    assert (model.predict(x_adv) != y).float().mean() > 0.5, "eps 0.2 is enough to change the colour class"


def test_targeted_craft_reaches_the_target(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    x, y = knn.to_float_images(images), torch.as_tensor(labels)
    target = (y + 1) % NUM_CLASSES
    for method in ("pgd", "apgd_ce", "knn_pgd"):
        x_adv = craft(model, x, y, method=method, eps=0.4, steps=20, target=target,
                      generator=torch.Generator().manual_seed(0))
        assert (model.predict(x_adv) == target).float().mean() > 0.8, method


def test_robust_mask(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data

    def attack(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        return craft(model, x, y, method="apgd_ce", eps=0.4, steps=10, generator=g)

    mask, adv = robust_mask(model, images, labels, attack, batch_size=8, keep_adversarial=True)
    assert mask.dtype == bool and mask.shape == (len(labels),)
    assert adv is not None and adv.shape == (len(labels), 3, 8, 8)
    assert mask.mean() < 0.2
    identity, none = robust_mask(model, images, labels, lambda x, y, g: x, batch_size=8)
    assert identity.all() and none is None
    empty, _ = robust_mask(model, images[:0], labels[:0], attack)
    assert empty.shape == (0,)
