"""Encoders: CIFAR-style ResNets and plain CNNs that take images in [0, 1] and return L2-normalised embeddings.

Normalisation (mean/std) lives inside the model so every caller - training, attacks, ONNX export and
the API - feeds raw [0, 1] pixels and eps is always in pixel units.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# blocks per stage; resnet10 is the narrow CPU-friendly member of the same family
ARCHS: dict[str, tuple[int, ...]] = {
    "resnet10": (1, 1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
# plain VGG-style CNNs (3x3 conv-BN-ReLU, convs per stage, 2x2 max-pool between stages): on a 2-core
# CPU they learn more per CPU-minute than the ResNets above (issue 10 measures it)
PLAIN_ARCHS: dict[str, tuple[int, ...]] = {
    "cnn8": (2, 2, 2, 2),
}


@dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to rebuild an encoder from an artifact manifest."""

    arch: str = "resnet18"
    width: int = 64  # channels of the first stage; 64 is the standard ResNet-18
    proj_dim: int = 128  # projection-head output (only used by the contrastive losses)
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    # an affine map of the normalised embedding to fewer dimensions, baked in at export (`training.reduce`): a wide
    # encoder then ships a bank small enough for the artifact size limit; None (training, most artifacts): no map
    reduce_dim: int | None = None
    # serve the mean of the embeddings of the image and of its left-right mirror image (set at export,
    # `--mirror-average`): a fixed, differentiable map (attacks see through both halves), twice the cost per image
    mirror_average: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS and self.arch not in PLAIN_ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {sorted(ARCHS) + sorted(PLAIN_ARCHS)}")
        if self.width < 1 or self.proj_dim < 1:
            raise ValueError(f"width and proj_dim must be positive, got {self.width}, {self.proj_dim}")
        if self.reduce_dim is not None and not 1 <= self.reduce_dim <= self.feature_dim:
            raise ValueError(f"reduce_dim must be in [1, {self.feature_dim}] (the backbone's feature size), "
                             f"got {self.reduce_dim}")
        # the model divides by std: a zero would make every embedding inf/NaN without an error
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values (RGB) and std > 0, got mean={self.mean}, std={self.std}")

    @property
    def feature_dim(self) -> int:
        """Size of the backbone's pooled features (what the training heads read)."""
        return 8 * self.width

    @property
    def embed_dim(self) -> int:
        """Size of the served embedding (the bank's rows)."""
        return self.reduce_dim or self.feature_dim

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "embed_dim": self.embed_dim}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        keys = {"arch", "width", "proj_dim", "mean", "std", "reduce_dim", "mirror_average"}
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in keys}
        return cls(**kw)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """CIFAR ResNet (3x3 stem, no max-pool); returns pooled features [B, 8*width]."""

    def __init__(self, blocks: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(self.stem(x))  # B x C x H' x W'
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # B x C


class PlainBackbone(nn.Module):
    """VGG-style CIFAR CNN: stage i has `convs[i]` 3x3 conv-BN-ReLU at width*2**i, then a 2x2 max-pool
    (none after the last); global average pool -> [B, 8*width] for four stages."""

    def __init__(self, convs: tuple[int, ...], width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, n in enumerate(convs):
            c_out = width * 2**i
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
            if i < len(convs) - 1:
                layers.append(nn.MaxPool2d(2))
        self.layers = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1)


def build_backbone(arch: str, width: int) -> nn.Module:
    if arch in PLAIN_ARCHS:
        return PlainBackbone(PLAIN_ARCHS[arch], width)
    return ResNetBackbone(ARCHS[arch], width)


class Encoder(nn.Module):
    """Images in [0, 1] [B, 3, H, W] -> L2-normalised embedding [B, embed_dim].

    The embedding is the normalised backbone feature (what k-NN uses); the projection head is a
    separate module because contrastive losses want it and k-NN is better without it. With
    `cfg.reduce_dim` the normalised feature goes through an affine map (`reduce`, a PCA set at export,
    not normalised again: an orthogonal projection keeps L2 distances, a second normalisation cost 0.6
    points of k-NN accuracy), so the ONNX file, the weights and the bank all carry the smaller embedding. With
    `cfg.mirror_average` the normalised features of the image and of its mirror image are averaged first (and
    normalised again when there is no map, so the embedding stays on the unit sphere).
    """

    mean: Tensor
    std: Tensor
    reduce: nn.Linear | None

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))
        self.backbone = build_backbone(cfg.arch, cfg.width)
        self.reduce = nn.Linear(cfg.feature_dim, cfg.reduce_dim) if cfg.reduce_dim else None

    def features(self, x: Tensor) -> Tensor:
        """Unnormalised backbone features [B, feature_dim]."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.mirror_average:
            # [2B, D] -> [2, B, D] -> mean: no batch size in the traced graph (the ONNX file keeps a dynamic batch)
            z = F.normalize(self.features(torch.cat([x, x.flip(3)])), dim=1).unflatten(0, (2, -1)).mean(0)
            if self.reduce is None:
                z = F.normalize(z, dim=1)
        else:
            z = F.normalize(self.features(x), dim=1)
        return z if self.reduce is None else self.reduce(z)


class ProjectionHead(nn.Module):
    """SimCLR MLP head: features -> L2-normalised projection for InfoNCE."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, h: Tensor) -> Tensor:
        return F.normalize(self.net(h), dim=1)


class ContrastiveModel(nn.Module):
    """Encoder + projection head, the unit trained by `ssl`, `sat` and `distill`.

    `align_dim` (distill only, when the student's embedding size differs from the teacher's): a bias-free
    linear map from the student's embedding to the teacher's, used only by the teacher-match term (FitNets
    style), so a wider student can learn from a narrower teacher; the served embedding is the student's own.
    """

    encoder: Encoder
    align: nn.Linear | None

    def __init__(self, cfg: EncoderConfig, align_dim: int | None = None) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.head = ProjectionHead(cfg.feature_dim, cfg.proj_dim)
        self.align = nn.Linear(cfg.embed_dim, align_dim, bias=False) if align_dim else None

    def forward(self, x: Tensor, embed: bool = False, align: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Images in [0, 1] -> projections [B, proj_dim] (embed=True: the encoder's embedding instead,
        so distillation runs through the same, possibly DDP-wrapped or compiled, module; align=True: the
        pair (embedding, embedding mapped into the teacher's space), the latter the embedding itself when
        there is no `align` map)."""
        if align:
            z = self.encoder(x)
            return z, (z if self.align is None else F.normalize(self.align(z), dim=1))
        if embed:
            return self.encoder(x)
        return self.head(self.encoder.features(x))


class SupervisedModel(nn.Module):
    """Encoder + linear classifier, trained with cross-entropy (`supervised`, `pgd_at`)."""

    def __init__(self, cfg: EncoderConfig, num_classes: int) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.head = nn.Linear(cfg.feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Images in [0, 1] -> logits [B, num_classes]."""
        return self.head(self.encoder.features(x))


def encoder_of(model: nn.Module) -> Encoder:
    """The `Encoder` inside a contrastive or supervised model (typed: `model.encoder` is an nn.Module attribute)."""
    enc = model.encoder
    if not isinstance(enc, Encoder):
        raise TypeError(f"{type(model).__name__} has no Encoder at .encoder")
    return enc


def build_encoder(cfg: EncoderConfig) -> Encoder:
    return Encoder(cfg)


def mirror_averaged(encoder: Encoder) -> Encoder:
    """A copy of `encoder` (same weights, eval mode) that serves the mean embedding of each image and its mirror
    image. A screen on the w32 student read +0.4 validation k-NN and +1.4-2.4 points of PGD-10 at T = 0.1
    (benchmarks/results/recipes.md), a surrogate that misranked votes before: the suite decides."""
    if encoder.cfg.mirror_average:
        raise ValueError("the encoder already averages over the mirror image")
    if encoder.cfg.reduce_dim is not None:
        raise ValueError("average over the mirror image before the PCA map is fitted (the map is fitted on its output)")
    return rebuilt(encoder, mirror_average=True)


def rebuilt(encoder: Encoder, new_weights: dict[str, Tensor] | None = None, **changes: Any) -> Encoder:
    """A new Encoder (CPU, eval mode) with `changes` to `encoder`'s config and its weights, plus `new_weights` for
    the modules the changes add: the export-time variants (`mirror_averaged`, `training.reduce.reduce_encoder`)."""
    out = Encoder(dataclasses.replace(encoder.cfg, **changes))
    out.load_state_dict({k: v.detach().cpu() for k, v in encoder.state_dict().items()} | (new_weights or {}))
    return out.eval()
