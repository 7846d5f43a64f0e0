"""Accuracy of an encoder + k-NN bank: clean, and under attacks on the differentiable surrogate.

The hard k-NN vote has no gradient, so attacks are crafted on `knn.SoftKnnClassifier` and the
result is scored by the hard vote the product serves (DESIGN section 6).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from training import attacks, knn, knn_attacks
from training.knn_attacks import AttackFn

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
        """[B, m', D] bank embeddings guiding the paper's attack: the m nearest of another class than y (of
        class `target` when given); m' = m capped at the fewest eligible bank samples of any image."""
        with attacks.eval_mode(self.encoder):
            z = self.encoder(x)
        if target is None:
            return knn.other_class_guides(z, y, self.bank, self.bank_labels, m).to(z.dtype)
        keep = self.bank_labels[None] == target[:, None]
        m = max(1, min(m, int(keep.sum(1).min())))
        d = torch.cdist(z, self.bank.to(z.dtype)).masked_fill(~keep, float("inf"))
        return self.bank[d.topk(m, dim=1, largest=False).indices].to(z.dtype)


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device, desc: str,
             progress: bool) -> Iterator[tuple[Tensor, Tensor]]:
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        yield knn.to_float_images(images[i:i + batch_size], device), torch.as_tensor(labels[i:i + batch_size],
                                                                                      device=device).long()


def clean_accuracy(model: KnnModel, images: np.ndarray, labels: np.ndarray, batch_size: int = 500,
                   progress: bool = False) -> float:
    device = model.bank.device
    correct = sum(int((model.predict(x) == y).sum()) for x, y in _batches(images, labels, batch_size, device,
                                                                          "clean", progress))
    return correct / len(labels)


def validation_figures(encoder: nn.Module, bank_images: np.ndarray, bank_labels: np.ndarray, num_classes: int,
                       query_images: np.ndarray, query_labels: np.ndarray, *, k: int, eval_robust: int = 0,
                       device: torch.device | str = "cpu", progress: bool = False) -> dict[str, float]:
    """k-NN accuracy of the query images against a bank of `bank_images` (`val_knn_acc`), and with `eval_robust`
    the hard-vote accuracy of the first of them under PGD-10 at 8/255 on the soft-kNN surrogate (T = 0.1,
    `val_pgd10_acc`): a cheap robustness signal for model selection, not the suite."""
    bank = knn.embed(encoder, bank_images, device=device, progress=progress).to(device)
    model = KnnModel(encoder, bank, torch.as_tensor(bank_labels, device=device), num_classes, min(k, len(bank)))
    out = {"val_knn_acc": clean_accuracy(model, query_images, query_labels, progress=progress)}
    if eval_robust:
        out["val_pgd10_acc"] = pgd_accuracy(model, query_images[:eval_robust], query_labels[:eval_robust],
                                            eps=8 / 255, steps=10)
    return out


def pgd_accuracy(model: KnnModel, images: np.ndarray, labels: np.ndarray, *, eps: float = 8 / 255,
                 alpha: float | None = None, steps: int = 10, temperature: float = 0.1, batch_size: int = 200,
                 seed: int = 0, progress: bool = False) -> float:
    """Hard k-NN accuracy under the catalogue's PGD (`knn_attacks` "pgd_ce": random start, step `alpha` * eps,
    default 2.5 / steps, final iterate) on the cross-entropy of the soft-kNN surrogate at `temperature`: the
    robust metric of training's validation and of export."""
    attack = knn_attacks.build("pgd_ce", model, knn_attacks.Budget(eps, steps, alpha),
                               knn_attacks.Surrogate(temperature))
    mask, _ = robust_mask(model, images, labels, attack, batch_size=batch_size, seed=seed, progress=progress,
                          desc=f"pgd-{steps}")
    return float(mask.mean()) if len(mask) else 0.0


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
