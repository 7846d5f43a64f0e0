"""NT-Xent, the SAT mutual-information loss and TRADES against references kept here, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from training import attacks, losses
from training.losses import cross_entropy, distillation_loss, info_nce, mutual_information_loss


def _unit(b: int, d: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def ref_nt_xent(z1: Tensor, z2: Tensor, t: float) -> float:
    """SimCLR eq. (1), one anchor at a time: -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), mean over 2B."""
    z = torch.cat([z1, z2]).tolist()
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        sims = [sum(a * c for a, c in zip(z[i], z[k], strict=True)) / t for k in range(n)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n


def ref_mi(z_clean: Tensor, z_adv: Tensor, t: float) -> float:
    """Two-sided InfoNCE: each adversarial row picks its clean twin among B clean rows, and vice versa."""
    c, a = z_clean.tolist(), z_adv.tolist()
    b = len(c)
    dot = [[sum(p * q for p, q in zip(a[i], c[j], strict=True)) / t for j in range(b)] for i in range(b)]
    adv_to_clean = sum(-dot[i][i] + math.log(sum(math.exp(dot[i][j]) for j in range(b))) for i in range(b)) / b
    clean_to_adv = sum(-dot[j][j] + math.log(sum(math.exp(dot[i][j]) for i in range(b))) for j in range(b)) / b
    return 0.5 * (adv_to_clean + clean_to_adv)


@pytest.mark.parametrize(("b", "d", "t"), [(1, 3, 0.5), (4, 8, 0.5), (5, 3, 0.1), (7, 16, 1.0)])
def test_info_nce_matches_reference(b: int, d: int, t: float) -> None:
    z1, z2 = _unit(b, d, 1), _unit(b, d, 2)
    assert info_nce(z1, z2, t).item() == pytest.approx(ref_nt_xent(z1, z2, t), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("b", "d", "t"), [(1, 3, 0.5), (4, 8, 0.5), (5, 3, 0.1), (7, 16, 1.0)])
def test_mutual_information_loss_matches_reference(b: int, d: int, t: float) -> None:
    zc, za = _unit(b, d, 3), _unit(b, d, 4)
    assert mutual_information_loss(zc, za, t).item() == pytest.approx(ref_mi(zc, za, t), rel=1e-9, abs=1e-12)


def test_losses_are_symmetric_in_their_two_arguments() -> None:
    z1, z2 = _unit(6, 5, 5), _unit(6, 5, 6)
    assert info_nce(z1, z2).item() == pytest.approx(info_nce(z2, z1).item(), rel=1e-12)
    assert mutual_information_loss(z1, z2).item() == pytest.approx(mutual_information_loss(z2, z1).item(), rel=1e-12)


def test_losses_are_invariant_to_a_shared_permutation_of_the_batch() -> None:
    z1, z2 = _unit(6, 5, 7), _unit(6, 5, 8)
    p = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert info_nce(z1[p], z2[p]).item() == pytest.approx(info_nce(z1, z2).item(), rel=1e-12)
    assert mutual_information_loss(z1[p], z2[p]).item() == pytest.approx(mutual_information_loss(z1, z2).item())


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_perfect_alignment_has_the_closed_form_minimum(t: float) -> None:
    # orthonormal rows, views identical: positive similarity 1, every negative 0
    b = 4
    z = torch.eye(b, dtype=torch.float64)
    assert info_nce(z, z, t).item() == pytest.approx(math.log1p((2 * b - 2) * math.exp(-1 / t)), rel=1e-12)
    assert mutual_information_loss(z, z, t).item() == pytest.approx(math.log1p((b - 1) * math.exp(-1 / t)), rel=1e-12)


def test_aligned_beats_random_beats_anti_aligned() -> None:
    z = _unit(16, 32, 9)
    other = _unit(16, 32, 10)
    for loss in (info_nce, mutual_information_loss):
        aligned, random, anti = loss(z, z).item(), loss(z, other).item(), loss(z, -z).item()
        assert aligned < random < anti, (loss.__name__, aligned, random, anti)


def test_random_pairs_are_near_chance() -> None:
    # unrelated high-dimensional unit vectors: all similarities ~0, loss ~ log(number of candidates)
    b = 8
    z1, z2 = _unit(b, 4096, 11), _unit(b, 4096, 12)
    assert info_nce(z1, z2, 1.0).item() == pytest.approx(math.log(2 * b - 1), abs=0.05)
    assert mutual_information_loss(z1, z2, 1.0).item() == pytest.approx(math.log(b), abs=0.05)


def test_gradient_pulls_the_twin_closer() -> None:
    z1, z2 = _unit(4, 6, 13).requires_grad_(True), _unit(4, 6, 14)
    for loss in (info_nce, mutual_information_loss):
        (g,) = torch.autograd.grad(loss(z1, z2), z1)
        assert torch.isfinite(g).all()
        # a small step against the gradient raises each anchor's similarity to its twin on average
        before = (z1 * z2).sum(1).mean()
        after = ((z1 - 0.1 * g) * z2).sum(1).mean()
        assert after > before, loss.__name__


@pytest.mark.parametrize("loss", [info_nce, mutual_information_loss])
@pytest.mark.parametrize(
    ("shape1", "shape2"),
    [((4, 3), (5, 3)), ((4, 3), (4, 2)), ((4,), (4,)), ((2, 4, 3), (2, 4, 3))],
)
def test_bad_shapes_raise(loss, shape1: tuple[int, ...], shape2: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected"):
        loss(torch.randn(shape1), torch.randn(shape2))


@pytest.mark.parametrize("loss", [info_nce, mutual_information_loss])
@pytest.mark.parametrize("t", [0.0, -0.5, float("nan")])
def test_bad_temperature_raises(loss, t: float) -> None:
    z = _unit(3, 4, 0)
    with pytest.raises(ValueError, match="temperature"):
        loss(z, z, t)


def test_cross_entropy_hand_values() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    # row 0: uniform over 4 -> log 4; row 1: p(0) = 3 / 6 -> log 2
    assert cross_entropy(logits, labels).item() == pytest.approx((math.log(4) + math.log(2)) / 2, rel=1e-12)


def test_distillation_loss_terms_and_ordering() -> None:
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    loss, match, robust = distillation_loss(t.clone(), t, t.clone(), beta=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # student = teacher, adversary moved nothing
    noise = torch.randn(8, 16, generator=g)
    _, _, near = distillation_loss(t, t, t + 0.1 * noise, beta=1.0)
    _, _, far = distillation_loss(t, t, t + 2.0 * noise, beta=1.0)
    assert 0 < near.item() < far.item() <= 2.0
    loss, match, robust = distillation_loss(-t, t, -t, beta=3.0)  # anti-aligned student, stable under attack
    assert match.item() == pytest.approx(2.0) and robust.item() == pytest.approx(0.0, abs=1e-6)
    # beta weighs only the robustness term; scale-free (cosine) in the student's features
    l1, _, r1 = distillation_loss(3 * t, t, t + noise, beta=1.0)
    l2, _, r2 = distillation_loss(t, t, t + noise, beta=2.0)
    assert r1.item() == pytest.approx(r2.item(), rel=1e-5)
    assert l1.item() == pytest.approx(r1.item(), rel=1e-5) and l2.item() == pytest.approx(2 * r1.item(), rel=1e-5)


def test_distillation_loss_matches_a_mapped_student_of_another_width() -> None:
    """A student wider than its teacher is matched through its mapped embedding; the robust term stays its own."""
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    s = torch.randn(8, 24, generator=g)
    loss, match, _ = distillation_loss(s, t, s.clone(), beta=2.0, student_mapped=t.clone())
    assert match.item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-6)
    _, off, _ = distillation_loss(s, t, s, beta=2.0, student_mapped=-t)
    assert off.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, t, s, beta=1.0)  # 24-d student against a 16-d teacher without a map
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(s, t, s, beta=1.0, student_mapped=t[:4])


def test_distillation_loss_rejects_bad_input() -> None:
    z = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(z, torch.zeros(4, 9), z, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(z, z, z, beta=float("nan"))


def test_trades_loss_is_cross_entropy_plus_beta_kl() -> None:
    torch.manual_seed(0)
    clean, adv, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss, kl = losses.trades_loss(clean, clean, y, beta=6.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(clean, y).item(), abs=1e-6)
    loss, kl = losses.trades_loss(clean, adv, y, beta=6.0)
    ref = F.kl_div(F.log_softmax(adv, 1), F.log_softmax(clean, 1), reduction="batchmean", log_target=True)
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5) and kl.item() > 0
    assert loss.item() == pytest.approx(F.cross_entropy(clean, y).item() + 6 * ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        losses.trades_loss(clean, adv, y, beta=-1.0)


def _robust_vs_brittle(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tsipras et al.'s toy in [0, 1]: one feature far from the boundary (0.1 / 0.9) that agrees with the label
    95 % of the time, and 50 that agree on average but sit 0.1 from it, within reach of eps = 0.15."""
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).float()
    agree = torch.where(torch.rand(n, generator=g) < 0.95, s, -s)
    robust = 0.5 + 0.4 * agree
    brittle = 0.5 + 0.1 * s[:, None] + 0.1 * torch.randn(n, 50, generator=g)
    return torch.cat([robust[:, None], brittle], 1).clamp(0, 1), y


def test_trades_beats_clean_training_under_attack_on_a_toy() -> None:
    """The same linear model and steps: clean CE leans on the brittle features, TRADES on the robust one."""
    g = torch.Generator().manual_seed(0)
    x, y = _robust_vs_brittle(512, g)
    x_test, y_test = _robust_vs_brittle(512, g)
    eps = 0.15

    def train(beta: float) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Linear(51, 2)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(150):
            if beta == 0:
                loss = F.cross_entropy(model(x), y)
            else:
                x_adv = attacks.pgd(attacks.kl_objective(model, model(x)), x, eps=eps, alpha=eps / 2, steps=5,
                                    generator=g)
                loss, _ = losses.trades_loss(model(x), model(x_adv), y, beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    def robust_acc(model: torch.nn.Module) -> float:
        x_adv = attacks.pgd(attacks.cross_entropy_objective(model, y_test), x_test, eps=eps, alpha=eps / 4, steps=20,
                            generator=g)
        return (model(x_adv).argmax(1) == y_test).float().mean().item()

    plain, trades = robust_acc(train(0.0)), robust_acc(train(6.0))
    assert plain < 0.7 and trades > 0.9, (plain, trades)  # measured: 0.55 and 0.96
