"""Contrastive and supervised losses as typed pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) over 2B views.

    z1, z2: [B, D] L2-normalised projections of two views of the same B images. Each of the 2B
    views has one positive (its twin) and 2B - 2 negatives. Returns the mean loss (scalar).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two [B, D] tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:  # also rejects NaN, which would make the loss NaN silently
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)  # 2B x D
    sim = z @ z.t() / temperature  # 2B x 2B
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def mutual_information_loss(z_clean: Tensor, z_adv: Tensor, temperature: float = 0.5) -> Tensor:
    """SAT objective (Chen et al., ICASSP 2020): InfoNCE lower bound on I(z(x); z(x')).

    Each adversarial embedding must pick its own clean embedding among the B clean ones of the batch
    (in-batch negatives), and vice versa. z_clean, z_adv: [B, D] L2-normalised. Scalar mean loss.
    """
    if z_clean.shape != z_adv.shape or z_clean.dim() != 2:
        raise ValueError(f"expected two [B, D] tensors, got {tuple(z_clean.shape)} and {tuple(z_adv.shape)}")
    if not temperature > 0:  # also rejects NaN, which would make the loss NaN silently
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = z_adv @ z_clean.t() / temperature  # B x B, diagonal = positives
    target = torch.arange(z_clean.shape[0], device=z_clean.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def distillation_loss(student: Tensor, teacher: Tensor, student_adv: Tensor, beta: float,
                      student_mapped: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Robust distillation (DeACL, Zhang et al. 2022): (1 - cos(s(x), t(x))) + beta (1 - cos(s(x'), s(x))).

    The first term inherits the clean teacher's neighbourhoods; the second (TRADES-like, not
    detached) flattens the student around x. Inputs [B, D]; cosine is taken after L2 normalisation,
    so unnormalised features work too. `student_mapped` [B, D_teacher]: the student's clean embedding
    mapped into the teacher's space (a student of another width), matched instead of `student`.
    Returns (loss, match term, robust term).
    """
    matched = student if student_mapped is None else student_mapped
    if (student.shape != student_adv.shape or matched.shape != teacher.shape or student.dim() != 2
            or len(matched) != len(student)):
        raise ValueError(f"shape mismatch: expected [B, D] student and student_adv and a [B, D_teacher] match of "
                         f"the teacher, got "
                         f"{tuple(student.shape)}, {tuple(student_adv.shape)}, {tuple(matched.shape)} vs "
                         f"{tuple(teacher.shape)}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    match = (1 - F.cosine_similarity(matched, teacher, dim=1)).mean()
    robust = (1 - F.cosine_similarity(student_adv, student, dim=1)).mean()
    return match + beta * robust, match, robust


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Supervised baseline loss; logits [B, C], labels [B] int64 or class probabilities [B, C] (soft targets)."""
    return F.cross_entropy(logits, labels)


def trades_kl(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """Per-sample KL(p(x) || p(x')) of the softmax outputs [B]: what TRADES' attack raises and its loss bounds."""
    log_clean = F.log_softmax(logits_clean, dim=1)
    return (log_clean.exp() * (log_clean - F.log_softmax(logits_adv, dim=1))).sum(1)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, labels: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x')), batch means; -> (loss, KL term).

    Accuracy on clean inputs and smoothness around them are separate terms, so beta trades one for the other
    (the paper's 6 favours robustness; 1 keeps more clean accuracy)."""
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    kl = trades_kl(logits_clean, logits_adv).mean()
    return F.cross_entropy(logits_clean, labels) + beta * kl, kl
