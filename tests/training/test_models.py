"""Encoders: shapes, unit-norm embeddings, normalisation inside the model, config validation."""

from __future__ import annotations

import json

import pytest
import torch

from training.models import (
    ARCHS,
    CIFAR_MEAN,
    CIFAR_STD,
    PLAIN_ARCHS,
    ContrastiveModel,
    Encoder,
    EncoderConfig,
    SupervisedModel,
    build_encoder,
    mirror_averaged,
)


def _images(b: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shapes_for_every_arch(arch: str) -> None:
    cfg = EncoderConfig(arch=arch, width=2, proj_dim=5)
    x = _images(3)
    enc = build_encoder(cfg).eval()
    assert isinstance(enc, Encoder) and cfg.embed_dim == 16
    assert enc(x).shape == (3, 16) and enc.features(x).shape == (3, 16)
    assert ContrastiveModel(cfg).eval()(x).shape == (3, 5)
    assert SupervisedModel(cfg, num_classes=7).eval()(x).shape == (3, 7)


def test_block_counts_match_the_arch_table() -> None:
    for arch, blocks in ARCHS.items():
        enc = Encoder(EncoderConfig(arch=arch, width=2))
        assert len(enc.backbone.layers) == sum(blocks)


def test_embeddings_and_projections_are_unit_norm() -> None:
    cfg = EncoderConfig(arch="resnet10", width=4, proj_dim=8)
    x = _images(5)
    for model in (Encoder(cfg), ContrastiveModel(cfg)):
        for mode in (True, False):
            out = model.train(mode)(x)
            torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_any_spatial_size_pools_to_the_same_embedding_dim() -> None:
    enc = Encoder(EncoderConfig(arch="resnet10", width=2)).eval()
    assert enc(_images(2, size=8)).shape == enc(_images(2, size=40)).shape == (2, 16)


def test_normalisation_lives_inside_the_model() -> None:
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(arch="resnet10", width=2, mean=mean, std=std)).eval()
    identity = Encoder(EncoderConfig(arch="resnet10", width=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))).eval()
    identity.backbone.load_state_dict(enc.backbone.state_dict())
    x = _images(4)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    # the model fed raw [0, 1] pixels == the same backbone fed pre-normalised pixels
    torch.testing.assert_close(enc.features(x), identity.features((x - m) / s))
    # the statistics travel with the weights (exported artifacts need no side channel)
    state = enc.state_dict()
    torch.testing.assert_close(state["mean"].flatten(), torch.tensor(mean))
    torch.testing.assert_close(state["std"].flatten(), torch.tensor(std))


def test_default_statistics_are_cifar() -> None:
    enc = Encoder(EncoderConfig(arch="resnet10", width=2))
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor(CIFAR_MEAN))
    torch.testing.assert_close(enc.std.flatten(), torch.tensor(CIFAR_STD))


def test_eval_mode_output_does_not_depend_on_the_batch() -> None:
    enc = Encoder(EncoderConfig(arch="resnet10", width=4))
    enc.train()(_images(8, seed=1))  # move BatchNorm running stats away from the init
    enc.eval()
    x = _images(4)
    torch.testing.assert_close(enc(x)[1:2], enc(x[1:2]))


def test_models_are_differentiable_wrt_the_input() -> None:
    model = SupervisedModel(EncoderConfig(arch="resnet10", width=2), num_classes=3).eval()
    x = _images(2).requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_config_round_trip_through_json() -> None:
    cfg = EncoderConfig(arch="resnet34", width=8, proj_dim=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["embed_dim"] == 64 and d["arch"] == "resnet34"
    assert EncoderConfig.from_dict(d) == cfg
    assert EncoderConfig.from_dict({"arch": "resnet10", "unknown": 1}) == EncoderConfig(arch="resnet10")


def test_mirror_average_is_the_mean_over_the_image_and_its_mirror() -> None:
    """The served embedding of a mirror-averaged encoder: mean of the two normalised features, on the unit sphere,
    the same for an image and its mirror image, differentiable, and the source encoder left as it was."""
    enc = Encoder(EncoderConfig(arch="cnn8", width=2))
    enc.train()(_images(8, seed=1))
    enc.eval()
    avg = mirror_averaged(enc)
    assert avg.cfg.mirror_average and not enc.cfg.mirror_average and not avg.training
    x = _images(3)
    want = torch.nn.functional.normalize(enc(x) + enc(x.flip(3)), dim=1)
    torch.testing.assert_close(avg(x), want)
    torch.testing.assert_close(avg(x.flip(3)), avg(x))
    assert not torch.allclose(enc(x), enc(x.flip(3)), atol=1e-3)  # the plain encoder is not mirror-invariant
    torch.testing.assert_close(avg(x).norm(dim=1), torch.ones(3))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(avg(xg)[:, 0].sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert EncoderConfig.from_dict(json.loads(json.dumps(avg.cfg.to_dict()))) == avg.cfg
    with pytest.raises(ValueError, match="already"):
        mirror_averaged(avg)
    with pytest.raises(ValueError, match="PCA"):
        mirror_averaged(Encoder(EncoderConfig(arch="cnn8", width=2, reduce_dim=4)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "resnet50"}, "unknown arch"),
        ({"width": 0}, "width"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": (0.2, -0.1, 0.2)}, "std"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**kwargs)


def test_plain_cnn_shapes_and_stage_layout() -> None:
    cfg = EncoderConfig(arch="cnn8", width=4, proj_dim=8)
    enc = Encoder(cfg).eval()
    assert enc(_images(3)).shape == (3, 32) and cfg.embed_dim == 32
    convs = [m for m in enc.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in enc.backbone.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == sum(PLAIN_ARCHS["cnn8"]) == 8 and len(pools) == 3
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert ContrastiveModel(cfg).eval()(_images(2)).shape == (2, 8)
    assert ContrastiveModel(cfg).eval()(_images(2), embed=True).shape == (2, 32)
