"""Batched two-view SimCLR augmentation on tensors (runs on whatever device the batch is on).

Every random choice is drawn per image in one tensor op, so a batch of 512 costs a handful of
kernels on a GPU instead of 512 PIL calls. Input and output: float [B, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR's CIFAR recipe (Chen et al. 2020), strengths as in the paper's appendix."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2


def _uniform(n: int, lo: float, hi: float, like: Tensor, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=like.device, generator=g, dtype=like.dtype) * (hi - lo) + lo


def random_resized_crop(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None = None) -> Tensor:
    """Per-image random crop + resize back to H x W + horizontal flip, as one affine grid_sample."""
    b = x.shape[0]
    area = _uniform(b, *cfg.crop_scale, x, g)
    log_r = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), x, g)
    ratio = log_r.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
    sh = (area / ratio).sqrt().clamp(max=1.0)
    cx = (_uniform(b, -1, 1, x, g)) * (1 - sw)  # crop centre in [-1, 1] coordinates, crop inside the image
    cy = (_uniform(b, -1, 1, x, g)) * (1 - sh)
    flip = torch.where(torch.rand(b, device=x.device, generator=g) < cfg.flip_p, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # B x 1 x H x W


_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _rotate_hue(x: Tensor, angle: Tensor) -> Tensor:
    """Hue shift as a rotation about the grey axis in YIQ space; angle [B] in radians.

    The three linear maps fold into one 3x3 RGB matrix per image, applied in a single bmm.
    """
    to_yiq = torch.tensor(_TO_YIQ, dtype=torch.float64)
    rot = torch.zeros(angle.shape[0], 3, 3, dtype=torch.float64)
    c, s = angle.double().cpu().cos(), angle.double().cpu().sin()
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s, s, c
    m = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(x.device, x.dtype)  # B x 3 x 3
    b, ch, h, w = x.shape
    return torch.bmm(m, x.reshape(b, ch, h * w)).view(b, ch, h, w)


def color_jitter(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None = None) -> Tensor:
    """Brightness, contrast, saturation, hue (fixed order), applied to a random subset of the batch."""
    b = x.shape[0]
    view = (b, 1, 1, 1)
    y = x * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, x, g).view(view)
    mean = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = (y - mean) * _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, x, g).view(view) + mean
    gray = _gray(y)
    y = (y - gray) * _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, x, g).view(view) + gray
    y = _rotate_hue(y.clamp(0, 1), _uniform(b, -cfg.hue, cfg.hue, x, g) * 2 * math.pi).clamp(0, 1)
    apply = (torch.rand(b, device=x.device, generator=g) < cfg.jitter_p).view(view)
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, p: float, g: torch.Generator | None = None) -> Tensor:
    apply = (torch.rand(x.shape[0], device=x.device, generator=g) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def augment(x: Tensor, cfg: AugmentConfig = AugmentConfig(), g: torch.Generator | None = None) -> Tensor:
    """One random SimCLR view of every image in the batch."""
    x = random_resized_crop(x, cfg, g)
    x = color_jitter(x, cfg, g)
    return random_grayscale(x, cfg.gray_p, g)


def two_views(
    x: Tensor, cfg: AugmentConfig = AugmentConfig(), g: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Two independent views of the same images, the positive pair of contrastive learning."""
    return augment(x, cfg, g), augment(x, cfg, g)


def gaussian_noise(x: Tensor, sigma: float, g: torch.Generator | None = None) -> Tensor:
    """x + N(0, sigma^2) per pixel in [0, 1] pixel units, not clipped: the noise randomized smoothing votes
    under (Cohen et al. 2019 train with exactly this), so an encoder trained with it stays accurate there."""
    if sigma == 0:
        return x
    return x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=g)


def crop_flip(x: Tensor, pad: int = 4, g: torch.Generator | None = None) -> Tensor:
    """Supervised CIFAR augmentation: random crop with reflection padding + horizontal flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=g)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=g)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None]  # B x H
    cols = dx[:, None] + torch.arange(w, device=x.device)[None]  # B x W
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # B x C x H x W
    flip = (torch.rand(b, device=x.device, generator=g) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(3), out)
