"""Conformal credibility of a k-NN vote (Deep k-NN, Papernot & McDaniel 2018), as pure functions.

Nonconformity of an input for label j: how many of its k neighbours do NOT say j (k - votes[j]).
Calibration: the nonconformity of held-out labelled inputs for their true label (the validation
split, never the bank or the test set). The p-value of label j for a new input is the share of
calibration scores at least as large as its nonconformity for j: a label the neighbours support as
well as they support typical correct answers gets p near 1, one they barely support gets p near 0.
Credibility = p-value of the predicted label (low: an input unlike anything calibrated, e.g. an
adversarial or out-of-distribution one); confidence = 1 - the second-highest p-value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CALIBRATION = "calibration.safetensors"  # the artifact file (training.artifact reads it)


def nonconformity(counts: Tensor, k: int) -> Tensor:
    """Vote counts [B, C] among the k nearest -> nonconformity [B, C] = k - counts (0 = unanimous)."""
    if counts.dim() != 2:
        raise ValueError(f"counts must be [B, C], got {tuple(counts.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k - counts.long()


def calibration_scores(counts: Tensor, labels: Tensor, k: int) -> Tensor:
    """Nonconformity of each calibration input for its true label, sorted ascending: int64 [N]."""
    if labels.shape != (counts.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] for counts {tuple(counts.shape)}")
    scores = nonconformity(counts, k).gather(1, labels.long().view(-1, 1).to(counts.device)).squeeze(1)
    return scores.sort().values.cpu()


def p_values(counts: Tensor, calibration: Tensor, k: int) -> Tensor:
    """p-value per class [B, C]: share of calibration scores >= the input's nonconformity for that class."""
    if calibration.dim() != 1 or calibration.numel() == 0:
        raise ValueError("calibration must be a non-empty 1-d tensor of scores")
    cal = calibration.to(counts.device).long().sort().values
    alpha = nonconformity(counts, k)
    below = torch.searchsorted(cal, alpha.reshape(-1).contiguous(), right=False)  # scores < alpha
    return (1.0 - below.float() / cal.numel()).view_as(alpha)


def p_value_table(calibration: Tensor, k: int) -> list[float]:
    """p-value of every possible nonconformity 0..k: table[a] = share of calibration scores >= a, the same
    numbers as `p_values` gives, as plain floats: a server reads p = table[k - votes] per class per request
    without a tensor op."""
    cal = calibration.long().sort().values
    below = torch.searchsorted(cal, torch.arange(k + 1), right=False)
    return (1.0 - below.float() / cal.numel()).tolist()


@dataclass(frozen=True)
class Trust:
    """Per-input conformal summary: credibility, confidence [B] and, with a threshold, who is abstained on."""

    credibility: Tensor
    confidence: Tensor
    p: Tensor  # [B, C]


def trust(counts: Tensor, pred: Tensor, calibration: Tensor, k: int) -> Trust:
    """Credibility (p-value of the predicted class) and confidence (1 - second-highest p) for each input."""
    p = p_values(counts, calibration, k)
    cred = p.gather(1, pred.long().view(-1, 1).to(p.device)).squeeze(1)
    top2 = p.topk(min(2, p.shape[1]), dim=1).values
    second = top2[:, 1] if p.shape[1] > 1 else torch.zeros_like(cred)
    return Trust(credibility=cred, confidence=1 - second, p=p)


def coverage_curve(credibility: Tensor, correct: Tensor, thresholds: Tensor | None = None) -> list[dict[str, float]]:
    """Accuracy vs coverage when answering only inputs with credibility >= t, for each threshold t."""
    if thresholds is None:
        thresholds = torch.linspace(0, 1, 21)
    rows = []
    for t in thresholds.tolist():
        keep = credibility >= t
        n = int(keep.sum())
        rows.append({"threshold": round(t, 4), "coverage": n / max(1, len(keep)),
                     "accuracy": float(correct[keep].float().mean()) if n else float("nan")})
    return rows


def threshold_for_coverage(credibility: Tensor, coverage: float) -> float:
    """The largest threshold that still answers at least `coverage` of these (clean) inputs."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    srt = credibility.sort(descending=True).values
    return float(srt[max(0, int(torch.ceil(torch.tensor(coverage * len(srt))).item()) - 1)])


def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of telling `positive` scores (higher) from `negative` ones; ties count half."""
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    pos, neg = positive.double().view(-1, 1), negative.double().view(1, -1)
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())
