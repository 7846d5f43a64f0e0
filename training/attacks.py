"""Adversarial attacks as pure functions of a differentiable objective.

One `pgd` serves SAT training, evaluation and the live `/attack` route. Inputs are images in
[0, 1]; eps is in the same pixel units (write 8/255). The objective maps a batch of candidate
images [B, C, H, W] to a per-example loss [B] that the attack MAXIMISES; a targeted attack passes
the negated loss. Results always lie in the eps ball around x and in [0, 1], and are detached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Objective = Callable[[Tensor], Tensor]
Norm = Literal["linf", "l2"]


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode (BatchNorm statistics frozen) and restore each caller's mode."""
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.train(was_training)


def _check_budget(eps: float, alpha: float, steps: int, norm: str) -> None:
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if eps < 0 or alpha < 0:
        raise ValueError(f"eps and alpha must be >= 0, got eps={eps}, alpha={alpha}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _flat_norm(t: Tensor) -> Tensor:
    """Per-example L2 norm, shaped [B, 1, 1, 1] for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project a perturbation onto the eps ball of the given norm."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * torch.clamp(eps / _flat_norm(delta), max=1.0)


def random_start(x: Tensor, eps: float, norm: Norm, generator: torch.Generator | None = None) -> Tensor:
    """A uniform point of the eps ball (linf) or a random direction of random radius (l2)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if norm == "linf":
        return (2 * u - 1) * eps
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
    return g / _flat_norm(g) * r * eps


def pgd(
    objective: Objective,
    x: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm = "linf",
    random_init: bool = True,
    model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on `objective` (Madry et al. 2018), L-inf or L2.

    x: [B, C, H, W] in [0, 1]. `model`, when given, is held in eval mode during the attack and its
    mode restored; parameter `.grad`s are never touched (torch.autograd.grad w.r.t. the input only).
    Returns x_adv, detached, with ||x_adv - x|| <= eps and x_adv in [0, 1].
    """
    _check_budget(eps, alpha, steps, norm)
    x = x.detach()
    delta = random_start(x, eps, norm, generator) if random_init else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    with eval_mode(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = objective(x + delta).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            step = grad.sign() if norm == "linf" else grad / _flat_norm(grad)
            delta = project(delta.detach() + alpha * step, eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def fgsm(objective: Objective, x: Tensor, *, eps: float, norm: Norm = "linf", model: nn.Module | None = None) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one full-size step, no random start."""
    return pgd(objective, x, eps=eps, alpha=eps, steps=1, norm=norm, random_init=False, model=model)


# --- objectives -------------------------------------------------------------------------------


def cross_entropy_objective(logits_fn: Callable[[Tensor], Tensor], labels: Tensor) -> Objective:
    """Untargeted: raise the cross-entropy of the true label. For targeted, negate and pass the target."""
    return lambda x: F.cross_entropy(logits_fn(x), labels, reduction="none")


def targeted_objective(logits_fn: Callable[[Tensor], Tensor], target: Tensor) -> Objective:
    """Targeted: lower the cross-entropy of `target` (same loss, opposite sign)."""
    return lambda x: -F.cross_entropy(logits_fn(x), target, reduction="none")


def margin_objective(logits_fn: Callable[[Tensor], Tensor], labels: Tensor) -> Objective:
    """CW margin: best other logit minus true logit; positive once misclassified."""

    def objective(x: Tensor) -> Tensor:
        logits = logits_fn(x)  # B x C
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
        return other - true

    return objective


def dlr_objective(logits_fn: Callable[[Tensor], Tensor], labels: Tensor) -> Objective:
    """Difference of logits ratio (Croce & Hein 2020): margin scaled by z_1 - z_3, scale invariant."""

    def objective(x: Tensor) -> Tensor:
        logits = logits_fn(x)  # B x C
        srt = logits.sort(dim=1, descending=True).values
        true = logits.gather(1, labels[:, None]).squeeze(1)
        is_top = srt[:, 0] == true
        other = torch.where(is_top, srt[:, 1], srt[:, 0])
        return (other - true) / (srt[:, 0] - srt[:, 2] + 1e-12)

    return objective


def embedding_objective(encoder: Callable[[Tensor], Tensor], x_clean: Tensor) -> Objective:
    """Label-free: push the embedding away from the clean one (minimise cosine similarity)."""
    with torch.no_grad():
        z0 = encoder(x_clean).detach()
    return lambda x: -(encoder(x) * z0).sum(dim=1)


def guided_objective(encoder: Callable[[Tensor], Tensor], guides: Tensor) -> Objective:
    """The paper's k-NN-guided attack: pull the embedding toward other-class samples.

    guides: [B, M, D] L2-normalised embeddings of M other-class samples per image (see
    `training.knn.other_class_guides`). Maximises the mean cosine similarity to them.
    """
    return lambda x: torch.einsum("bd,bmd->b", encoder(x), guides) / guides.shape[1]
