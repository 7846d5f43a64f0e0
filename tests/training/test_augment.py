"""Batched augmentation: shapes, [0, 1] range, randomness under a seeded generator, content kept."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from training.augment import (
    AugmentConfig,
    augment,
    color_jitter,
    crop_flip,
    gaussian_noise,
    random_grayscale,
    random_resized_crop,
    two_views,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    x = torch.rand(b, 3, size, size, generator=_gen(seed))
    x[0], x[1] = 1.0, 0.0  # saturated images are where range bugs show
    return x


def _pattern(b: int, size: int = 8) -> torch.Tensor:
    """Every pixel of every image distinct, so any crop/flip can be located exactly."""
    return torch.arange(b * 3 * size * size, dtype=torch.float32).view(b, 3, size, size) / (b * 3 * size * size)


OPS = {
    "augment": lambda x, g: augment(x, AugmentConfig(), g),
    "crop": lambda x, g: random_resized_crop(x, AugmentConfig(), g),
    "jitter": lambda x, g: color_jitter(x, AugmentConfig(jitter_p=1.0, brightness=0.9, contrast=0.9), g),
    "gray": lambda x, g: random_grayscale(x, 1.0, g),
    "crop_flip": lambda x, g: crop_flip(x, g=g),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_shape_dtype_and_range(op: str) -> None:
    x = _images()
    y = OPS[op](x, _gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1, (y.min().item(), y.max().item())


@pytest.mark.parametrize("op", sorted(OPS))
def test_deterministic_with_a_seeded_generator(op: str) -> None:
    x = _images()
    torch.testing.assert_close(OPS[op](x, _gen(3)), OPS[op](x, _gen(3)), rtol=0, atol=0)
    if op != "gray":  # p=1 grayscale has no randomness left
        assert not torch.equal(OPS[op](x, _gen(3)), OPS[op](x, _gen(4)))


def test_two_views_differ_and_leave_the_input_alone() -> None:
    x = torch.rand(8, 3, 32, 32, generator=_gen())  # no constant images: crops of those all look alike
    before = x.clone()
    v1, v2 = two_views(x, g=_gen(0))
    assert torch.equal(x, before)
    assert v1.shape == v2.shape == x.shape
    # each image's two views differ (crop, flip and colour are drawn independently per view)
    assert ((v1 - v2).flatten(1).abs().amax(1) > 1e-3).all()


def test_full_crop_is_identity_or_exact_horizontal_flip() -> None:
    x = _pattern(4)
    full = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
    keep = random_resized_crop(x, AugmentConfig(**full, flip_p=0.0), _gen())
    flip = random_resized_crop(x, AugmentConfig(**full, flip_p=1.0), _gen())
    torch.testing.assert_close(keep, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(flip, x.flip(3), atol=1e-5, rtol=0)


def test_random_resized_crop_zooms_in_on_a_region() -> None:
    # a small-area crop of a left-black / right-white image is uniform more often than the image is
    x = torch.zeros(64, 1, 16, 16).expand(64, 3, 16, 16).clone()
    x[..., 8:] = 1.0
    y = random_resized_crop(x, AugmentConfig(crop_scale=(0.05, 0.1), flip_p=0.0), _gen())
    uniform = (y.flatten(1).amax(1) - y.flatten(1).amin(1)) < 1e-6
    assert uniform.any() and not uniform.all()


def test_crop_flip_keeps_content() -> None:
    """Each output is one 16x16 window of the reflect-padded image, maybe mirrored; both flips occur."""
    b, size, pad = 32, 8, 2
    x = _pattern(b, size)
    y = crop_flip(x, pad=pad, g=_gen())
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    flips = []
    for i in range(b):
        matches = []
        for dy, dx, fl in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (False, True)):
            window = padded[i, :, dy:dy + size, dx:dx + size]
            if torch.equal(y[i], window.flip(2) if fl else window):
                matches.append((dy, dx, fl))
        assert len(matches) == 1, (i, matches)
        flips.append(matches[0][2])
    assert any(flips) and not all(flips)


def test_crop_flip_without_padding_is_identity_or_flip() -> None:
    x = _pattern(16)
    y = crop_flip(x, pad=0, g=_gen())
    for xi, yi in zip(x, y, strict=True):
        assert torch.equal(yi, xi) or torch.equal(yi, xi.flip(2))


def test_grayscale_weights_and_probability() -> None:
    x = _images()
    g = random_grayscale(x, 1.0)
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(g[:, c], expected)
    assert torch.equal(random_grayscale(x, 0.0), x)


def test_jitter_off_is_identity_and_hue_keeps_grey_pixels_grey() -> None:
    x = _images()
    assert torch.equal(color_jitter(x, AugmentConfig(jitter_p=0.0), _gen()), x)
    # zero strengths: only clamping and a zero-angle hue rotation, i.e. the identity
    none = AugmentConfig(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    torch.testing.assert_close(color_jitter(x, none, _gen()), x, atol=1e-5, rtol=0)
    # hue rotates about the grey axis: a grey image is unchanged by any hue shift
    grey = x[:, :1].expand_as(x).clone()
    hue_only = AugmentConfig(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5)
    torch.testing.assert_close(color_jitter(grey, hue_only, _gen()), grey, atol=1e-5, rtol=0)
    # and a coloured image is changed by it
    assert (color_jitter(x, hue_only, _gen()) - x).abs().amax() > 0.05


def test_gaussian_noise_statistics_seeding_and_off() -> None:
    x = torch.full((64, 3, 32, 32), 0.5)
    assert gaussian_noise(x, 0.0) is x  # off: the very input, no random numbers drawn
    a = gaussian_noise(x, 0.25, torch.Generator().manual_seed(3))
    b = gaussian_noise(x, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    d = a - x
    assert abs(d.mean().item()) < 0.01 and abs(d.std().item() - 0.25) < 0.01
    assert a.max() > 1.0 and a.min() < 0.0  # not clipped, as Cohen et al. smooth
