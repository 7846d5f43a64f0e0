"""Adversarial weight perturbation: the step's size and direction, undoing it, the BN statistics it must not touch,
and its place in a PGD-AT or TRADES training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.training.conftest import TINY_ENCODER
from training import awp
from training.config import TrainConfig
from training.train import Step, build_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_perturbable_takes_conv_and_linear_weights_only() -> None:
    net = _net()
    got = awp.perturbable(net)
    assert [tuple(w.shape) for w in got] == [(4, 3, 3, 3), (3, 144)]  # no biases, no BatchNorm scale/shift


def test_weight_perturbation_has_relative_size_gamma_along_the_gradient() -> None:
    w = [torch.randn(4, 3, 3, 3), torch.randn(3, 5)]
    g = [torch.randn(4, 3, 3, 3), torch.zeros(3, 5)]
    v = awp.weight_perturbation(w, g, 0.01)
    assert v[0].norm() / w[0].norm() == pytest.approx(0.01, rel=1e-5)
    assert F.cosine_similarity(v[0].flatten(), g[0].flatten(), dim=0) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(v[1], torch.zeros(3, 5))  # no gradient, no move
    with pytest.raises(ValueError, match="gamma"):
        awp.weight_perturbation(w, g, -0.1)
    with pytest.raises(ValueError, match="gradients"):
        awp.weight_perturbation(w, g[:1], 0.01)


def test_the_perturbation_raises_the_loss_and_shifting_back_restores_the_weights() -> None:
    net = _net().eval()
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 3
    weights = awp.perturbable(net)
    before = [w.detach().clone() for w in weights]
    loss = F.cross_entropy(net(x), y)
    v = awp.weight_perturbation(weights, torch.autograd.grad(loss, weights), 0.05)
    awp.shift(weights, v)
    with torch.no_grad():
        assert F.cross_entropy(net(x), y) > loss  # a step up the loss
    awp.shift(weights, v, sign=-1.0)
    assert all(torch.allclose(w, b, atol=1e-7) for w, b in zip(weights, before, strict=True))


def test_frozen_buffers_keeps_batchnorm_statistics() -> None:
    net = _net().train()
    bn = net[1]
    mean, var, seen = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    with awp.frozen_buffers(net):
        net(torch.rand(8, 3, 8, 8) * 5)
        assert not torch.equal(bn.running_mean, mean)  # the forward pass did move them
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == seen


def _step_update(awp_gamma: float, lr: float, trades_beta: float = 0.0
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights before, weights after) one PGD-AT (or TRADES) step with SGD at `lr` on a tiny encoder."""
    cfg = TrainConfig(method="pgd_at", eps=8 / 255, alpha=4 / 255, attack_steps=2, awp_gamma=awp_gamma,
                      trades_beta=trades_beta, **TINY_ENCODER)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    step = Step(cfg, model, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss, _ = step(torch.rand(6, 3, 32, 32), torch.arange(6) % 3)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step.restore()
    return before, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("trades_beta", [0.0, 6.0], ids=["pgd_at", "trades"])
def test_a_step_with_awp_moves_weights_only_by_the_update(trades_beta: float) -> None:
    """With lr = 0 the weights come back exactly (the perturbation is undone, not kept); with lr > 0 the update
    differs from the plain step's (its gradient was taken at the perturbed weights): PGD-AT, and TRADES-AWP, whose
    perturbation climbs the TRADES loss."""
    before, after = _step_update(0.01, lr=0.0, trades_beta=trades_beta)
    params = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.allclose(before[k], after[k], atol=1e-7) for k in params)
    _, plain = _step_update(0.0, lr=0.1, trades_beta=trades_beta)
    _, perturbed = _step_update(0.01, lr=0.1, trades_beta=trades_beta)
    moved = [k for k in params if before[k].dim() > 1]
    assert any(not torch.allclose(plain[k], perturbed[k]) for k in moved)
    # BatchNorm counted one training batch, as without AWP (the perturbation's own forward pass is not one)
    counters = [k for k in before if k.endswith("num_batches_tracked")]
    assert counters and all(int(perturbed[k]) == int(plain[k]) == int(before[k]) + 1 for k in counters)


def _trades_loss_of_a_step(awp_gamma: float) -> float:
    """The TRADES loss a step returns (taken at the perturbed weights with AWP), same init, images and attack."""
    cfg = TrainConfig(method="pgd_at", eps=8 / 255, alpha=4 / 255, attack_steps=2, awp_gamma=awp_gamma,
                      trades_beta=6.0, **TINY_ENCODER)
    torch.manual_seed(0)
    step = Step(cfg, build_model(cfg, num_classes=3), torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss, _ = step(torch.rand(8, 3, 32, 32), torch.arange(8) % 3)
    step.restore()
    return loss.item()


def test_trades_awp_climbs_the_trades_loss() -> None:
    """TRADES-AWP's perturbation is a step up the TRADES loss itself: at the perturbed weights the same clean and
    adversarial images cost more than at the weights the step started from (the attack runs before the move, so
    both steps see the same images)."""
    plain = _trades_loss_of_a_step(0.0)
    assert _trades_loss_of_a_step(0.05) > plain + 1e-4


def test_awp_config_is_for_pgd_at_and_pseudo_at() -> None:
    TrainConfig(method="pgd_at", awp_gamma=0.01)
    TrainConfig(method="pseudo_at", awp_gamma=0.01, teacher="t.pt")
    TrainConfig(method="pseudo_at", awp_gamma=0.005, trades_beta=6.0, teacher="t.pt")  # TRADES-AWP
    for bad in ({"method": "ssl"}, {"method": "distill", "teacher": "t.pt"}, {"method": "pgd_at", "awp_gamma": -1}):
        with pytest.raises(ValueError, match="awp_gamma"):
            TrainConfig(**{"awp_gamma": 0.01, **bad})


def test_a_tiny_pgd_at_run_with_awp_trains_in_bf16(tiny_cifar: Path, tmp_path: Path) -> None:
    """The flag end to end: `satml train --awp-gamma` parses, the run finishes in bf16 autocast + channels_last (the
    CPU recipe's set-up) and its checkpoint records the setting."""
    from tests.training.test_train import tiny_config
    from training.checkpoint import CHECKPOINT, load_checkpoint
    from training.cli import build_parser
    from training.train import train

    args = build_parser().parse_args(["train", "--method", "pgd_at", "--awp-gamma", "0.02"])
    assert args.awp_gamma == 0.02
    cfg = tiny_config(tiny_cifar, tmp_path / "run", method="pgd_at", eps=8 / 255, alpha=4 / 255, awp_gamma=0.01,
                      precision="bf16", memory_format="channels_last")
    assert train(cfg)["finished"]
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert ckpt["config"]["awp_gamma"] == 0.01
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
