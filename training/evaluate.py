"""Accuracy of an encoder + k-NN bank: clean, and under attacks on the differentiable surrogate.

The hard k-NN vote has no gradient, so attacks are crafted on `knn.SoftKnnClassifier` and the
result is scored by the hard vote the product serves (DESIGN section 6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from training import attacks, knn

if TYPE_CHECKING:
    from training.artifact import Artifact


@dataclass
class KnnModel:
    """Everything needed to classify: encoder, bank, vote parameters."""

    encoder: nn.Module
    bank: Tensor  # [N, D]
    bank_labels: Tensor  # [N]
    num_classes: int
    k: int = 75
    metric: knn.Metric = "l2"

    @classmethod
    def from_artifact(cls, art: Artifact) -> KnnModel:
        """The classifier an artifact serves (encoder, bank, k, metric from its manifest)."""
        return cls(art.encoder, art.bank, art.bank_labels, art.num_classes, art.k, art.metric)  # type: ignore[arg-type]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Hard k-NN predictions [B] for images in [0, 1]."""
        return self.predict_votes(x)[0]

    @torch.no_grad()
    def predict_votes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Hard k-NN (pred [B], vote counts [B, C]) for images in [0, 1]."""
        with attacks.eval_mode(self.encoder):
            z = self.encoder(x)
        return knn.knn_predict(z, self.bank, self.bank_labels, self.num_classes, self.k, self.metric)

    def fooled(self, y: Tensor) -> attacks.SuccessFn:
        """Success test for `attacks.pgd/apgd(is_adversarial=...)`: the hard vote no longer says y."""
        return lambda x: self.predict(x) != y

    def surrogate(self, temperature: float = 0.1, k: int | None = None) -> knn.SoftKnnClassifier:
        return knn.SoftKnnClassifier(self.encoder, self.bank, self.bank_labels, self.num_classes, temperature, k)

    @torch.no_grad()
    def guides(self, x: Tensor, y: Tensor, m: int, target: Tensor | None = None) -> Tensor:
        """[B, m, D] bank embeddings guiding the paper's attack: the m nearest of another class than y
        (of class `target` when given)."""
        with attacks.eval_mode(self.encoder):
            z = self.encoder(x)
        m = min(m, int(self.bank.shape[0]))
        if target is None:
            return knn.other_class_guides(z, y, self.bank, self.bank_labels, m).to(z.dtype)
        keep = self.bank_labels[None] == target[:, None]
        d = torch.cdist(z, self.bank.to(z.dtype)).masked_fill(~keep, float("inf"))
        return self.bank[d.topk(m, dim=1, largest=False).indices].to(z.dtype)


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


def step_size(eps: float, steps: int) -> float:
    """PGD step for a budget: 2.5 * eps / steps (Madry et al.), at least eps / 4 so short runs reach the boundary."""
    return max(eps / 4, 2.5 * eps / steps)


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


def guided_attack(model: KnnModel, x: Tensor, y: Tensor, *, eps: float, alpha: float, steps: int, guides: int = 32,
                  target: Tensor | None = None, random_init: bool = True, generator: torch.Generator | None = None,
                  is_adversarial: attacks.SuccessFn | None = None) -> Tensor:
    """The paper's k-NN-guided embedding attack (Chen et al. 2020): L-inf PGD pulling the embedding toward
    the `guides` nearest bank samples of other classes (of `target`, when given). x [B, 3, H, W], y [B]."""
    objective = attacks.guided_objective(model.encoder, model.guides(x, y, guides, target))
    return attacks.pgd(objective, x, eps=eps, alpha=alpha, steps=steps, random_init=random_init, model=model.encoder,
                       generator=generator, is_adversarial=is_adversarial)


AttackFn = Callable[[Tensor, Tensor, torch.Generator], Tensor]  # (x [B, 3, H, W], y [B], generator) -> x_adv


def predictions(model: KnnModel, images: np.ndarray | Tensor, batch_size: int = 500) -> np.ndarray:
    """Hard k-NN predictions (int64 [N]) for uint8 NHWC or float NCHW images."""
    device = model.bank.device
    out = [model.predict(knn.to_float_images(images[i:i + batch_size], device)).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def robust_mask(model: KnnModel, images: np.ndarray | Tensor, labels: np.ndarray, attack: AttackFn, *,
                batch_size: int = 200, seed: int = 0, progress: bool = False, desc: str = "attack",
                keep_adversarial: bool = False) -> tuple[np.ndarray, Tensor | None]:
    """Run `attack` over the images in batches and score every result with the hard k-NN vote.

    Returns (correct bool [N]: the vote still says the label, adversarial images [N, 3, H, W] float32 on CPU
    when `keep_adversarial`). One generator seeded with `seed` drives all random starts.
    """
    device = model.bank.device
    g = torch.Generator(device=device).manual_seed(seed)
    correct, kept = [], []
    for i in tqdm(range(0, len(labels), batch_size), desc=desc, disable=not progress, leave=False):
        x = knn.to_float_images(images[i:i + batch_size], device)
        y = torch.as_tensor(labels[i:i + batch_size], device=device).long()
        x_adv = attack(x, y, g)
        correct.append((model.predict(x_adv) == y).cpu())
        if keep_adversarial:
            kept.append(x_adv.float().cpu())
    mask = torch.cat(correct).numpy() if correct else np.zeros(0, dtype=bool)
    return mask, (torch.cat(kept) if kept else None) if keep_adversarial else None


AttackMethod = str  # one of ATTACK_METHODS


def craft(model: KnnModel, x: Tensor, y: Tensor, *, method: AttackMethod = "pgd", eps: float = 8 / 255,
          steps: int = 10, target: Tensor | None = None, temperature: float = 0.1, guides: int = 32,
          generator: torch.Generator | None = None, surrogate_k: int | None = None) -> Tensor:
    """Adversarial images against a k-NN model by named method; shared by evaluation and the API.

    fgsm      one signed step on the soft-kNN surrogate's cross-entropy
    pgd       PGD (random start, step 2.5 * eps / steps) on the surrogate's cross-entropy
    knn_pgd   the paper's k-NN-guided embedding attack: pull toward the nearest other-class bank samples
    adaptive  PGD on the surrogate's CW margin (scale-free, no softmax saturation)
    apgd_ce   APGD (Croce & Hein 2020) on the surrogate's cross-entropy, step size self-tuned
    apgd_dlr  APGD on the surrogate's DLR loss (untargeted; targeted uses the cross-entropy)
    embedding label-free PGD pushing the embedding away from the clean one (ignores `target`)
    x [B, 3, H, W] in [0, 1]; y [B] the labels to move away from; target [B] makes it targeted. The
    surrogate is the soft-kNN at `temperature` over the whole bank, or over the `surrogate_k` nearest.
    """
    if method not in ATTACK_METHODS:
        raise ValueError(f"unknown attack method {method!r}; expected one of {sorted(ATTACK_METHODS)}")
    surrogate = model.surrogate(temperature, surrogate_k)
    alpha = step_size(eps, steps)
    if method == "knn_pgd":
        return guided_attack(model, x, y, eps=eps, alpha=alpha, steps=steps, guides=guides, target=target,
                             generator=generator)
    objective = _CRAFT_OBJECTIVES[method](model, surrogate, x, y)
    if target is not None and method != "embedding":
        objective = attacks.targeted_objective(surrogate, target)
    if method == "fgsm":
        return attacks.fgsm(objective, x, eps=eps, model=model.encoder)
    if method.startswith("apgd"):
        return attacks.apgd(objective, x, eps=eps, steps=steps, model=model.encoder, generator=generator)
    return attacks.pgd(objective, x, eps=eps, alpha=alpha, steps=steps, model=model.encoder, generator=generator)


_CRAFT_OBJECTIVES: dict[str, Callable[[KnnModel, nn.Module, Tensor, Tensor], attacks.Objective]] = {
    "fgsm": lambda m, s, x, y: attacks.cross_entropy_objective(s, y),
    "pgd": lambda m, s, x, y: attacks.cross_entropy_objective(s, y),
    "adaptive": lambda m, s, x, y: attacks.margin_objective(s, y),
    "apgd_ce": lambda m, s, x, y: attacks.cross_entropy_objective(s, y),
    "apgd_dlr": lambda m, s, x, y: attacks.dlr_objective(s, y),
    "embedding": lambda m, s, x, y: attacks.embedding_objective(m.encoder, x),
}
ATTACK_METHODS = ("fgsm", "pgd", "knn_pgd", "adaptive", "apgd_ce", "apgd_dlr", "embedding")
