"""Conformal credibility (Deep k-NN): p-values against brute force, ordering, coverage, AUROC."""

from __future__ import annotations

import pytest
import torch

from training import conformal


def _counts(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _random_votes(seed: int, k: int, n_cal: int, classes: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration scores [n_cal] in 0..k and vote counts [rows, classes] of k neighbours each."""
    g = torch.Generator().manual_seed(seed)
    cal = torch.randint(0, k + 1, (n_cal,), generator=g)
    counts = torch.stack([torch.bincount(torch.randint(0, classes, (k,), generator=g), minlength=classes)
                          for _ in range(rows)])
    return cal, counts


def test_p_values_match_the_definition_by_brute_force() -> None:
    k = 9
    cal, counts = _random_votes(0, k, n_cal=50, classes=4, rows=20)
    p = conformal.p_values(counts, cal, k)
    alpha = k - counts
    brute = torch.tensor([[float((cal >= a).float().mean()) for a in row] for row in alpha.tolist()])
    torch.testing.assert_close(p, brute)


def test_p_value_table_gives_the_same_numbers_as_p_values() -> None:
    k = 9
    cal, counts = _random_votes(1, k, n_cal=40, classes=3, rows=15)
    p = conformal.p_values(counts, cal, k)
    table = conformal.p_value_table(cal, k)
    assert len(table) == k + 1 and table[0] == 1.0
    assert [[table[k - v] for v in row] for row in counts.tolist()] == p.tolist()


def test_calibration_scores_are_the_true_label_nonconformity_sorted() -> None:
    counts = _counts([[5, 0, 0], [1, 4, 0], [0, 0, 5], [2, 2, 1]])
    labels = torch.tensor([0, 0, 2, 1])
    assert conformal.calibration_scores(counts, labels, k=5).tolist() == [0, 0, 3, 4]


def test_unanimous_vote_is_fully_credible_and_split_vote_is_not() -> None:
    cal = torch.tensor([0, 0, 0, 1, 1, 2, 3, 5])  # most correct calibration inputs were (nearly) unanimous
    counts = _counts([[5, 0, 0], [2, 2, 1], [0, 5, 0]])
    t = conformal.trust(counts, counts.argmax(1), cal, k=5)
    assert t.credibility[0] == 1.0 and t.credibility[2] == 1.0
    assert t.credibility[1] < 0.5
    assert t.confidence[0] > t.confidence[1]  # a split vote leaves a strong runner-up
    assert ((t.p >= 0) & (t.p <= 1)).all()


def test_coverage_curve_and_threshold() -> None:
    cred = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.05])
    correct = torch.tensor([True, True, False, True, False])
    rows = {r["threshold"]: r for r in conformal.coverage_curve(cred, correct, torch.tensor([0.0, 0.5]))}
    assert rows[0.0]["coverage"] == 1.0 and rows[0.0]["accuracy"] == pytest.approx(0.6)
    assert rows[0.5]["coverage"] == pytest.approx(0.6) and rows[0.5]["accuracy"] == 1.0
    t = conformal.threshold_for_coverage(cred, 0.6)
    assert t == pytest.approx(0.7) and float((cred >= t).float().mean()) >= 0.6
    with pytest.raises(ValueError):
        conformal.threshold_for_coverage(cred, 0.0)


def test_auroc() -> None:
    assert conformal.auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert conformal.auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert conformal.auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        conformal.p_values(_counts([[1, 0]]), torch.tensor([], dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        conformal.nonconformity(torch.zeros(3, dtype=torch.long), 1)
