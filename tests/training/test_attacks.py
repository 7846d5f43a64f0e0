"""Attacks (training.attacks): budgets, ranges, side effects, strength, and agreement with torchattacks.

A 4-class toy problem of 3x4x4 images (class = a colour pattern plus noise) and a small MLP trained in
a second; eps values are chosen so robust accuracy is between 0 and clean.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import attacks

NUM_CLASSES = 4
SHAPE = (3, 4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images in [0, 1]: a class mean (fixed random pattern) plus Gaussian noise."""
    means = torch.rand((NUM_CLASSES, *SHAPE), generator=torch.Generator().manual_seed(123)) * 0.25 + 0.375
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = (means[y] + 0.06 * torch.randn((n, *SHAPE), generator=g)).clamp(0, 1)
    return x, y


class ModeRecorder(nn.Module):
    """An MLP that remembers whether it ran in training mode (to prove attacks use eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))
        self.seen_training: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen_training.append(self.training)
        return self.net(x)


@pytest.fixture(scope="module")
def toy() -> tuple[ModeRecorder, Tensor, Tensor]:
    torch.manual_seed(0)
    model = ModeRecorder()
    x, y = toy_data(2000, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = toy_data(400, seed=1)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.9, "toy model should fit the toy problem"
    return model, xt, yt


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


AttackCall = Callable[[nn.Module, Tensor, Tensor, float, torch.Generator], Tensor]

ATTACKS: dict[str, AttackCall] = {
    "pgd": lambda m, x, y, eps, g: attacks.pgd(attacks.cross_entropy_objective(m, y), x, eps=eps, alpha=eps / 4,
                                               steps=10, model=m, generator=g),
    "pgd_l2": lambda m, x, y, eps, g: attacks.pgd(attacks.cross_entropy_objective(m, y), x, eps=eps * 4,
                                                  alpha=eps, steps=10, norm="l2", model=m, generator=g),
    "pgd_tracked": lambda m, x, y, eps, g: attacks.pgd(attacks.margin_objective(m, y), x, eps=eps, alpha=eps / 4,
                                                       steps=10, model=m, generator=g,
                                                       is_adversarial=lambda z: m(z).argmax(1) != y),
    "fgsm": lambda m, x, y, eps, g: attacks.fgsm(attacks.cross_entropy_objective(m, y), x, eps=eps, model=m),
    "apgd_ce": lambda m, x, y, eps, g: attacks.apgd_ce(m, x, y, eps=eps, steps=10, model=m, generator=g),
    "apgd_dlr": lambda m, x, y, eps, g: attacks.apgd_dlr(m, x, y, eps=eps, steps=10, model=m, generator=g),
    "apgd_l2": lambda m, x, y, eps, g: attacks.apgd_ce(m, x, y, eps=eps * 4, steps=10, norm="l2", model=m,
                                                       generator=g),
    "apgd_tracked": lambda m, x, y, eps, g: attacks.apgd_ce(m, x, y, eps=eps, steps=10, model=m, generator=g,
                                                            is_adversarial=lambda z: m(z).argmax(1) != y),
    "noise": lambda m, x, y, eps, g: attacks.noise(x, eps=eps, generator=g),
    "square": lambda m, x, y, eps, g: attacks.square(lambda xs, i: attacks.margin_objective(m, y[i])(xs), x, eps=eps,
                                                     queries=200, model=m, generator=g),
}


def run_watched(model: ModeRecorder, attack: Callable[[], Tensor]) -> Tensor:
    """Run `attack` on a model in training mode with sentinel parameter grads; assert that it ran the model in
    eval mode, restored training mode and left the grads alone. Returns the attack's output."""
    model.train()
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s.clone()
    model.seen_training.clear()
    try:
        x_adv = attack()
    finally:
        was_training = model.training
        model.eval()
    assert was_training, "the caller's training mode must be restored"
    assert not any(model.seen_training), "attacks must run the model in eval mode"
    for p, s in zip(model.parameters(), sentinel, strict=True):
        assert torch.equal(p.grad, s), "parameter .grad must not be touched"
        p.grad = None
    return x_adv


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_contract(name: str, toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    """In the eps ball and [0, 1], detached, model mode restored (eval during), parameter grads untouched."""
    model, x, y = toy
    x, y = x[:64], y[:64]
    eps = 0.05
    x_adv = run_watched(model, lambda: ATTACKS[name](model, x, y, eps, torch.Generator().manual_seed(0)))
    assert x_adv.shape == x.shape and not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if name.endswith("l2"):
        assert delta.norm(dim=1).max() <= 4 * eps + 1e-5
    else:
        assert delta.abs().max() <= eps + 1e-6


@pytest.mark.parametrize("name", ["pgd", "pgd_tracked", "fgsm", "apgd_ce", "apgd_dlr", "apgd_tracked", "square"])
def test_attacks_beat_random_noise(name: str, toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    model, x, y = toy
    eps = 0.05
    noisy = accuracy(model, attacks.noise(x, eps=eps, generator=torch.Generator().manual_seed(0)), y)
    adv = accuracy(model, ATTACKS[name](model, x, y, eps, torch.Generator().manual_seed(0)), y)
    assert adv < noisy - 0.1, f"{name}: {adv:.3f} vs noise {noisy:.3f}"


@pytest.mark.parametrize("name", ["pgd_tracked", "apgd_ce", "apgd_dlr"])
def test_success_increases_with_eps(name: str, toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    model, x, y = toy
    accs = [accuracy(model, ATTACKS[name](model, x, y, eps, torch.Generator().manual_seed(0)), y)
            for eps in (0.0, 0.03, 0.045, 0.055, 0.07, 0.5)]
    assert all(b <= a + 0.01 for a, b in itertools.pairwise(accs)), accs
    assert accs[0] == pytest.approx(accuracy(model, x, y)), "eps 0 must leave the images unchanged"
    assert accs[-1] < 0.05, f"a large eps must break almost everything: {accs}"


def test_apgd_at_least_as_strong_as_pgd(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    """Same budget (20 gradient steps), same loss: APGD's adaptive step should not lose to fixed-step PGD."""
    model, x, y = toy
    for eps in (0.045, 0.055):
        for loss in (attacks.cross_entropy_objective, attacks.dlr_objective):
            pgd = attacks.pgd(loss(model, y), x, eps=eps, alpha=eps / 4, steps=20, model=model,
                              generator=torch.Generator().manual_seed(0))
            apgd = attacks.apgd(loss(model, y), x, eps=eps, steps=20, model=model,
                                generator=torch.Generator().manual_seed(0))
            assert accuracy(model, apgd, y) <= accuracy(model, pgd, y) + 0.01, (eps, loss.__name__)


def test_apgd_returns_its_best_point(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    """The returned point's loss is at least that of the random start (the first point APGD evaluates)."""
    model, x, y = toy
    eps = 0.05
    objective = attacks.cross_entropy_objective(model, y)
    x0 = (x + attacks.random_start(x, eps, "linf", torch.Generator().manual_seed(3))).clamp(0, 1)
    x_adv = attacks.apgd(objective, x, eps=eps, steps=15, model=model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (objective(x_adv) >= objective(x0) - 1e-5).all()


def test_apgd_checkpoints_follow_the_paper() -> None:
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert attacks.apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert attacks.apgd_checkpoints(1) == [1]


def test_apgd_halves_the_step_when_stuck() -> None:
    """On a constant objective nothing rises: every checkpoint halves the step, so the iterate stops moving
    far from where it restarts; on a linear one the step is kept and the corner is reached."""
    x = torch.full((2, 1, 2, 2), 0.5)
    flat = attacks.apgd(lambda z: 0 * z.flatten(1).sum(1), x, eps=0.1, steps=30, random_init=False)
    assert torch.equal(flat, x), "no improvement ever: the best point is the start"
    w = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 2, 2)
    lin = attacks.apgd(lambda z: (z * w).flatten(1).sum(1), x, eps=0.1, steps=5, random_init=False)
    assert torch.allclose(lin, x + 0.1 * w), "a linear objective is maximised at the signed corner"


def test_tracking_returns_adversarial_points(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    model, x, y = toy
    eps = 0.05

    def fooled(z: Tensor) -> Tensor:
        return model(z).argmax(1) != y

    for run in (ATTACKS["pgd_tracked"], ATTACKS["apgd_tracked"]):
        x_adv = run(model, x, y, eps, torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert fooled(x_adv).float().mean() > 0.2
    untracked = ATTACKS["pgd"](model, x, y, eps, torch.Generator().manual_seed(0))
    tracked = attacks.pgd(attacks.cross_entropy_objective(model, y), x, eps=eps, alpha=eps / 4, steps=10,
                          model=model, generator=torch.Generator().manual_seed(0), is_adversarial=fooled)
    assert accuracy(model, tracked, y) <= accuracy(model, untracked, y)


def test_same_seed_same_result(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    model, x, y = toy
    for name in ("pgd", "apgd_ce", "noise"):
        a = ATTACKS[name](model, x, y, 0.05, torch.Generator().manual_seed(5))
        b = ATTACKS[name](model, x, y, 0.05, torch.Generator().manual_seed(5))
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kwargs", [{"eps": -0.1}, {"steps": 0}, {"norm": "l1"}, {"rho": 0.0}, {"momentum": 1.5}])
def test_apgd_rejects_bad_budgets(kwargs: dict) -> None:
    budget = {"eps": 0.1, "steps": 5, **kwargs}
    with pytest.raises(ValueError):
        attacks.apgd(lambda z: z.flatten(1).sum(1), torch.rand(1, 1, 2, 2), **budget)


def test_dlr_objective_is_scale_invariant(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    model, x, y = toy
    a = attacks.dlr_objective(model, y[:16])(x[:16])
    b = attacks.dlr_objective(lambda z: 10 * model(z) + 3, y[:16])(x[:16])
    assert torch.allclose(a, b, atol=1e-4)


def test_agreement_with_torchattacks(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    """Our PGD / APGD-CE / APGD-DLR against torchattacks' (independent implementation) on the same model,
    images and budget: robust accuracies within a few points."""
    pytest.importorskip("torchattacks", reason="torchattacks not installed (test-only: pip install --no-deps "
                                               "torchattacks); the cross-check needs it")
    from training.robustness import torchattacks_agreement

    model, x, y = toy
    images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # the uint8 path the suite uses
    for eps in (0.045, 0.055):
        res = torchattacks_agreement(model, images, y.numpy(), eps=eps, pgd_steps=10, apgd_steps=20)
        for row in res["rows"]:
            assert 0 < row["torchattacks"] < res["clean"], row  # a meaningful comparison: neither 0 nor clean
            assert abs(row["diff_points"]) <= 3.0, (eps, row)


def test_square_window_schedule_follows_the_paper() -> None:
    assert attacks.square_fraction(0, 10_000, 0.05) == 0.05
    assert attacks.square_fraction(11, 10_000, 0.05) == 0.025
    assert attacks.square_fraction(9_999, 10_000, 0.8) == pytest.approx(0.8 / 2**9)
    assert attacks.square_fraction(50, 100, 0.05) == attacks.square_fraction(5_000, 10_000, 0.05)  # rescaled


def test_square_needs_no_gradient_and_stops_when_successful(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    """Score-only: works through torch.no_grad scores, and more queries never help a finished image."""
    model, x, y = toy
    calls: list[int] = []

    def score(xs: Tensor, idx: Tensor) -> Tensor:
        calls.append(len(idx))
        assert not torch.is_grad_enabled()
        return attacks.margin_objective(model, y[idx])(xs)

    few = attacks.square(score, x, eps=0.05, queries=20, generator=torch.Generator().manual_seed(0))
    many = attacks.square(score, x, eps=0.05, queries=300, generator=torch.Generator().manual_seed(0))
    assert accuracy(model, many, y) <= accuracy(model, few, y)
    assert calls[0] == len(x) and min(calls) < len(x)  # the fooled images stopped querying


# ---------------------------------------------------------------- N-FGSM (a training adversary)


def test_nfgsm_leaves_the_eps_ball_by_design_but_not_noise_plus_step() -> None:
    """Noise of 2 eps plus a step of eps, no projection: the perturbation reaches past eps, never past 3 eps,
    and the images stay in [0, 1]."""
    model, x, y = _toy_model_and_data()
    eps = 0.05
    x_adv = attacks.nfgsm(attacks.cross_entropy_objective(model, y), x, eps=eps, model=model,
                          generator=torch.Generator().manual_seed(0))
    gap = (x_adv - x).abs().amax()
    assert eps < gap <= 3 * eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad


def test_nfgsm_without_noise_is_fgsm_and_keeps_model_mode_and_grads(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    model, x, y = toy
    got = run_watched(model, lambda: attacks.nfgsm(attacks.cross_entropy_objective(model, y), x, eps=0.05, noise=0.0,
                                                   model=model))
    assert model.seen_training  # it ran the model (in eval mode: run_watched)
    want = attacks.fgsm(attacks.cross_entropy_objective(model, y), x, eps=0.05, model=model)
    assert torch.allclose(got, want)


def test_nfgsm_beats_noise_of_its_size(toy: tuple[ModeRecorder, Tensor, Tensor]) -> None:
    model, x, y = toy
    eps = 0.05
    noisy = accuracy(model, attacks.noise(x, eps=3 * eps, generator=torch.Generator().manual_seed(0)), y)
    adv = accuracy(model, attacks.nfgsm(attacks.cross_entropy_objective(model, y), x, eps=eps, model=model,
                                        generator=torch.Generator().manual_seed(0)), y)
    assert adv < noisy - 0.1, (adv, noisy)


@pytest.mark.parametrize("kwargs", [{"eps": 0.0}, {"eps": 0.1, "noise": -1.0}, {"eps": 0.1, "step": 0.0}])
def test_nfgsm_refuses_bad_sizes(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="eps"):
        attacks.nfgsm(lambda z: z.sum((1, 2, 3)), torch.rand(2, 3, 4, 4), **kwargs)


def _toy_model_and_data() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, NUM_CLASSES))
    x, y = toy_data(64, seed=2)
    return model, x, y
