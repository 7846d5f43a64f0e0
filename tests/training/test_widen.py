"""training.widen: Net2WiderNet widening of a plain CNN keeps its function; --init uses it for wide students."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.checkpoint import save_checkpoint
from training.config import TrainConfig
from training.models import ContrastiveModel, Encoder, EncoderConfig
from training.train import Step, build_model, init_from
from training.widen import widen_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = EncoderConfig(arch="cnn8", width=4, proj_dim=8)


def _trained_like(cfg: EncoderConfig) -> ContrastiveModel:
    """Random weights with non-trivial BatchNorm statistics (a few training-mode passes)."""
    torch.manual_seed(0)
    model = ContrastiveModel(cfg).train()
    with torch.no_grad():
        for _ in range(3):
            model.encoder(torch.rand(16, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("width", [6, 8, 12])
def test_widening_without_noise_keeps_the_function(width: int) -> None:
    narrow = _trained_like(NARROW)
    state, align = widen_encoder(narrow.state_dict(), NARROW, width, noise=0.0)
    wide = Encoder(EncoderConfig(arch="cnn8", width=width, proj_dim=8)).eval()
    wide.load_state_dict({k[len("encoder."):]: v for k, v in state.items()}, strict=True)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        z, zw = narrow.encoder(x), wide(x)
    assert zw.shape == (5, 8 * width) and align.shape == (8 * NARROW.width, 8 * width)
    torch.testing.assert_close(F.normalize(zw @ align.t(), dim=1), z, atol=1e-5, rtol=1e-4)


def test_noise_breaks_the_symmetry_of_the_copies() -> None:
    narrow = _trained_like(NARROW)
    exact, _ = widen_encoder(narrow.state_dict(), NARROW, 8, noise=0.0)
    noisy, _ = widen_encoder(narrow.state_dict(), NARROW, 8, noise=0.01)
    for key in ("encoder.backbone.layers.0.weight", "encoder.backbone.layers.3.weight"):
        c = exact[key].shape[0] // 2
        assert torch.equal(exact[key][:c], noisy[key][:c]) and not torch.equal(exact[key][c:], noisy[key][c:])
        assert (exact[key][c:] - noisy[key][c:]).abs().max() < 0.1 * exact[key].abs().max()


def test_widening_rejects_what_it_cannot_keep() -> None:
    narrow = _trained_like(NARROW)
    with pytest.raises(ValueError, match="narrower"):
        widen_encoder(narrow.state_dict(), NARROW, 2)
    resnet = EncoderConfig(arch="resnet10", width=4)
    with pytest.raises(ValueError, match="plain CNN"):
        widen_encoder(ContrastiveModel(resnet).state_dict(), resnet, 8)


def test_init_widens_a_narrow_teacher_into_a_wide_distillation_student(tmp_path: Path) -> None:
    """--init from a narrower cnn8: the wide student's mapped embedding starts at the teacher's (match term ~0)."""
    teacher = _trained_like(NARROW)
    path = tmp_path / "teacher.pt"
    tcfg = TrainConfig(method="ssl", arch="cnn8", width=4, proj_dim=8)
    save_checkpoint(path, {"model": teacher.state_dict(), "config": asdict(tcfg), "step": 0})
    cfg = TrainConfig(method="distill", teacher=str(path), init=str(path), arch="cnn8", width=8, proj_dim=8,
                      attack_steps=1, eps=8 / 255, alpha=8 / 255)
    student = build_model(cfg, 10)
    init_from(student, str(path))
    student.eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        _, mapped = student(x, align=True)
        t = teacher.encoder(x)
    assert F.cosine_similarity(mapped, t, dim=1).min() > 0.99
    # and it trains: one step reaches the widened encoder and the map
    loss, _ = Step(cfg, student.train(), torch.Generator().manual_seed(0))(x, torch.zeros(6, dtype=torch.long))
    loss.backward()
    assert student.align is not None and student.align.weight.grad is not None
