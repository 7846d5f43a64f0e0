"""benchmarks/open_set.py's open-set check on a toy bank whose answer is known (issue 14)."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from tests.benchmarks.conftest import load_script

CORNERS = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]])


@pytest.fixture(scope="module")
def open_set() -> ModuleType:
    return load_script("open_set")


def split(module: ModuleType, n: int, seed: int, centres: torch.Tensor) -> object:
    """n points per class around each centre (class c at centres[c])."""
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([c + 0.7 * torch.randn(n, 2, generator=g) for c in centres])
    return module.Embedded(z, torch.arange(len(centres)).repeat_interleave(n))


def test_a_class_missing_from_the_bank_between_the_others_is_rejected(open_set: ModuleType) -> None:
    # four known classes at the corners, a fifth at the centre: its neighbours in a bank without it are split
    # between the corners (a low credibility), a known class's are unanimous
    centres = torch.cat([CORNERS, torch.zeros(1, 2)])
    bank, val, test = (split(open_set, n, seed, centres) for n, seed in ((60, 0), (25, 1), (40, 2)))
    r = open_set.open_set(bank, val, test, held=[4], num_classes=5, k=15)
    assert r["n_known"] == 160 and r["n_held_out"] == 40
    assert r["known_accuracy"] > 0.97
    assert r["auroc_credibility"] > 0.95 and r["held_out_rejected"] > 0.8
    assert 0.89 <= r["known_answered"] <= 1.0  # the threshold answers >= 90 % of the known-class test images
    assert r["mean_credibility_known"] > r["mean_credibility_held_out"]
    # credibility is monotone in the winning vote count: the same ranking as the vote share
    assert r["auroc_credibility"] == r["auroc_vote_share"]


def test_a_missing_class_that_sits_on_a_known_one_is_not_caught(open_set: ModuleType) -> None:
    # the held-out class drawn from the same place as class 0: its neighbours all vote 0, so credibility (and any
    # score of the vote) cannot tell it apart: AUROC near chance, not near 1 (the check's known blind spot)
    centres = torch.cat([CORNERS, CORNERS[:1]])
    bank, val, test = (split(open_set, n, seed, centres) for n, seed in ((60, 0), (25, 1), (40, 2)))
    r = open_set.open_set(bank, val, test, held=[4], num_classes=5, k=15)
    assert 0.35 < r["auroc_credibility"] < 0.75 and r["held_out_rejected"] < 0.3
