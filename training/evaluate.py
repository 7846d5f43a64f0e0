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


AttackMethod = str  # one of ATTACK_METHODS


def craft(model: KnnModel, x: Tensor, y: Tensor, *, method: AttackMethod = "pgd", eps: float = 8 / 255,
          steps: int = 10, target: Tensor | None = None, temperature: float = 0.1, guides: int = 32,
          generator: torch.Generator | None = None) -> Tensor:
    """Adversarial images against a k-NN model by named method; shared by evaluation and the API.

    fgsm     one signed step on the soft-kNN surrogate's cross-entropy
    pgd      PGD (random start, step 2.5 * eps / steps) on the surrogate's cross-entropy
    knn_pgd  the paper's k-NN-guided embedding attack: pull toward the nearest other-class bank samples
    adaptive PGD on the surrogate's CW margin (scale-free, no softmax saturation), the strongest here
    x [B, 3, H, W] in [0, 1]; y [B] the labels to move away from; target [B] makes it targeted.
    """
    if method not in ATTACK_METHODS:
        raise ValueError(f"unknown attack method {method!r}; expected one of {sorted(ATTACK_METHODS)}")
    surrogate = model.surrogate(temperature)
    alpha = max(eps / 4, 2.5 * eps / steps)
    if method == "knn_pgd":
        with torch.no_grad(), attacks.eval_mode(model.encoder):
            z = model.encoder(x)
        if target is not None:  # guide toward the target class only
            keep = model.bank_labels[None] == target[:, None]
            d = torch.cdist(z, model.bank.to(z.dtype)).masked_fill(~keep, float("inf"))
            g = model.bank[d.topk(guides, dim=1, largest=False).indices]
        else:
            g = knn.other_class_guides(z, y, model.bank, model.bank_labels, guides)
        objective = attacks.guided_objective(model.encoder, g.to(z.dtype))
    elif target is not None:
        objective = attacks.targeted_objective(surrogate, target)
    elif method == "adaptive":
        objective = attacks.margin_objective(surrogate, y)
    else:
        objective = attacks.cross_entropy_objective(surrogate, y)
    if method == "fgsm":
        return attacks.fgsm(objective, x, eps=eps, model=model.encoder)
    return attacks.pgd(objective, x, eps=eps, alpha=alpha, steps=steps, model=model.encoder, generator=generator)


ATTACK_METHODS = ("fgsm", "pgd", "knn_pgd", "adaptive")
