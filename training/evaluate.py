"""Accuracy of an encoder + k-NN bank: clean, and under attacks on the differentiable surrogate.

The hard k-NN vote has no gradient, so attacks are crafted on `knn.SoftKnnClassifier` and the
result is scored by the hard vote the product serves (DESIGN section 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from training import attacks, knn


@dataclass
class KnnModel:
    """Everything needed to classify: encoder, bank, vote parameters."""

    encoder: nn.Module
    bank: Tensor  # [N, D]
    bank_labels: Tensor  # [N]
    num_classes: int
    k: int = 75
    metric: knn.Metric = "l2"

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Hard k-NN predictions [B] for images in [0, 1]."""
        with attacks.eval_mode(self.encoder):
            z = self.encoder(x)
        return knn.knn_predict(z, self.bank, self.bank_labels, self.num_classes, self.k, self.metric)[0]

    def surrogate(self, temperature: float = 0.1, k: int | None = None) -> knn.SoftKnnClassifier:
        return knn.SoftKnnClassifier(self.encoder, self.bank, self.bank_labels, self.num_classes, temperature, k)


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device, desc: str, progress: bool):
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        yield knn.to_float_images(images[i:i + batch_size], device), torch.as_tensor(labels[i:i + batch_size],
                                                                                      device=device).long()


def clean_accuracy(model: KnnModel, images: np.ndarray, labels: np.ndarray, batch_size: int = 500,
                   progress: bool = False) -> float:
    device = model.bank.device
    correct = sum(int((model.predict(x) == y).sum()) for x, y in _batches(images, labels, batch_size, device,
                                                                          "clean", progress))
    return correct / len(labels)


def pgd_accuracy(model: KnnModel, images: np.ndarray, labels: np.ndarray, *, eps: float = 8 / 255,
                 alpha: float = 2 / 255, steps: int = 10, temperature: float = 0.1, batch_size: int = 200,
                 seed: int = 0, progress: bool = False) -> float:
    """Hard k-NN accuracy under L-inf PGD (random start) on the soft-kNN surrogate's cross-entropy."""
    device = model.bank.device
    surrogate = model.surrogate(temperature)
    g = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    for x, y in _batches(images, labels, batch_size, device, f"pgd-{steps}", progress):
        x_adv = attacks.pgd(attacks.cross_entropy_objective(surrogate, y), x, eps=eps, alpha=alpha, steps=steps,
                            model=model.encoder, generator=g)
        correct += int((model.predict(x_adv) == y).sum())
    return correct / len(labels)
