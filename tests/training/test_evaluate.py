"""training.evaluate: the k-NN model, the accuracy helpers and robust_mask (the attacks: test_knn_attacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from tests.training.colour_toy import NUM_CLASSES, data_fixture, model_fixture  # noqa: F401  (fixtures)
from training import knn, knn_attacks
from training.evaluate import KnnModel, clean_accuracy, pgd_accuracy, predictions, robust_mask

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_pgd_accuracy(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    small = pgd_accuracy(model, images, labels, eps=1 / 255, steps=3)
    large = pgd_accuracy(model, images, labels, eps=0.5, alpha=0.2, steps=10)
    assert 0 <= large <= small <= 1
    assert large < 0.2, "at eps 0.5 any colour is reachable"


def test_pgd_accuracy_is_the_catalogue_pgd(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    """One implementation: the training/export metric is the catalogue's pgd_ce scored by robust_mask."""
    images, labels = data
    attack = knn_attacks.build("pgd_ce", model, knn_attacks.Budget(0.2, 5), knn_attacks.Surrogate(0.2))
    mask, _ = robust_mask(model, images, labels, attack, batch_size=7, seed=3)
    assert pgd_accuracy(model, images, labels, eps=0.2, steps=5, temperature=0.2, batch_size=7, seed=3) == mask.mean()
    assert 0 < mask.mean() < 1, "a radius that breaks some images, not all"


def test_robust_mask(model: KnnModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data

    def attack(x: Tensor, y: Tensor, g: torch.Generator) -> Tensor:
        return knn_attacks.craft(model, x, y, method="apgd_ce", eps=0.4, steps=10, generator=g)

    mask, adv = robust_mask(model, images, labels, attack, batch_size=8, keep_adversarial=True)
    assert mask.dtype == bool and mask.shape == (len(labels),)
    assert adv is not None and adv.shape == (len(labels), 3, 8, 8)
    assert mask.mean() < 0.2
    identity, none = robust_mask(model, images, labels, lambda x, y, g: x, batch_size=8)
    assert identity.all() and none is None
    empty, _ = robust_mask(model, images[:0], labels[:0], attack)
    assert empty.shape == (0,)
