"""Adversarial weight perturbation (AWP, Wu, Xia & Wang 2020) for PGD-AT and pseudo_at (issue 10).

Why: adversarial training overfits (robust accuracy on held-out images peaks, then falls) and the weight loss
landscape's flatness tracks the robust generalisation gap. AWP trains at the worst nearby weights: before each
update the conv and linear weights move by `gamma * ||w||` (per layer) along the gradient of the adversarial loss,
the update's gradient is taken there, and the move is undone after the optimiser step. The paper's setting for
PGD-AT is gamma = 0.01 from the first epoch; it costs one more forward and backward pass per step.

Pure functions over lists of tensors: the training step (`training.train.Step`) owns when they run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

EPS = 1e-20


def perturbable(model: nn.Module) -> list[Tensor]:
    """The weights AWP moves: every parameter with more than one dimension (conv kernels, linear matrices);
    biases and BatchNorm scales stay put, as in the paper."""
    return [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]


def weight_perturbation(weights: Sequence[Tensor], grads: Sequence[Tensor], gamma: float) -> list[Tensor]:
    """Per layer, `gamma * ||w|| * g / ||g||`: a step of relative size gamma up the loss (a zero gradient gives a
    zero step)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if len(weights) != len(grads):
        raise ValueError(f"{len(weights)} weights but {len(grads)} gradients")
    return [gamma * w.detach().float().norm() / (g.float().norm() + EPS) * g.detach().float()
            for w, g in zip(weights, grads, strict=True)]


@torch.no_grad()
def shift(weights: Sequence[Tensor], deltas: Sequence[Tensor], sign: float = 1.0) -> None:
    """w += sign * delta for each weight, in place (sign -1 undoes a perturbation)."""
    for w, d in zip(weights, deltas, strict=True):
        w.add_(d.to(w.dtype), alpha=sign)


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics, batch counters) on exit: the extra forward pass that
    finds the perturbation must not count as a training batch."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved, strict=True):
                b.copy_(s)
