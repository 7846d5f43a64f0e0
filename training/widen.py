"""Function-preserving widening of a plain CNN encoder (Net2WiderNet, Chen, Goodfellow & Shlens 2016).

Why: robust distillation at width 16 is capacity-bound (issue 10: the student's robustness stops rising
after 4 epochs), but a wider student trained from scratch must first relearn the teacher. Widening the
teacher's own weights gives a wider student that starts as the teacher: every new channel copies an
existing one (the next layer's weights into the copies are divided by the number of copies), BatchNorm
statistics are copied with their channels, and a little noise on the copies breaks their symmetry. The
linear map `align` from the wide embedding back to the teacher's (the average of each channel's copies)
is returned too, so the distillation's match term starts at zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.models import PLAIN_ARCHS, EncoderConfig

CONV = "encoder.backbone.layers."


def _channel_map(old: int, new: int, g: torch.Generator) -> Tensor:
    """[new] source channel of each new channel: the old ones in order, then random copies (spread evenly)."""
    extra = torch.randperm(old, generator=g)
    reps = -(-(new - old) // old)  # ceil
    return torch.cat([torch.arange(old), extra.repeat(reps)[: new - old]])


def widen_encoder(state: dict[str, Tensor], cfg: EncoderConfig, width: int, *, noise: float = 0.01,
                  seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Widen the `encoder.*` weights of a cnn8-style model to `width`; returns (state for an encoder of the wider
    config, align [teacher embed_dim, wide embed_dim]). `noise`: std of the symmetry-breaking noise on the copied
    output channels, relative to each layer's weight std (0: exactly the teacher's function)."""
    if cfg.arch not in PLAIN_ARCHS:
        raise ValueError(f"widening needs a plain CNN ({sorted(PLAIN_ARCHS)}), got {cfg.arch!r}")
    if cfg.reduce_dim is not None:
        raise ValueError("cannot widen an encoder with an export-time reduction (widen its unreduced checkpoint)")
    if width < cfg.width:
        raise ValueError(f"cannot widen width {cfg.width} to a narrower {width}")
    g = torch.Generator().manual_seed(seed)  # channel maps (the same for any noise level)
    g_noise = torch.Generator().manual_seed(seed + 1)
    convs = sorted({int(k[len(CONV):].split(".")[0]) for k in state
                    if k.startswith(CONV) and state[k].dim() == 4})
    out = {k: v.clone() for k, v in state.items() if k.startswith("encoder.") and not k.startswith(CONV)}
    prev: Tensor | None = None  # channel map of the previous layer's output
    for i in convs:
        w = state[f"{CONV}{i}.weight"]
        if prev is not None:  # inputs: each copy gets its share of the original channel's weight
            counts = torch.bincount(prev, minlength=w.shape[1]).to(w.dtype)
            w = w[:, prev] / counts[prev][None, :, None, None]
        c_old = w.shape[0]
        c_new = c_old * width // cfg.width  # exact: stage s has width * 2**s channels
        cmap = _channel_map(c_old, c_new, g)
        w = w[cmap].clone()
        if noise > 0 and c_new > c_old:
            w[c_old:] += noise * w.std() * torch.randn(w[c_old:].shape, generator=g_noise, dtype=w.dtype)
        out[f"{CONV}{i}.weight"] = w
        bn = i + 1  # conv, BatchNorm, ReLU
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{CONV}{bn}.{name}"] = state[f"{CONV}{bn}.{name}"][cmap].clone()
        out[f"{CONV}{bn}.num_batches_tracked"] = state[f"{CONV}{bn}.num_batches_tracked"].clone()
        prev = cmap
    assert prev is not None, "no conv layers found"
    counts = torch.bincount(prev).float()
    align = torch.zeros(cfg.feature_dim, len(prev))
    align[prev, torch.arange(len(prev))] = 1 / counts[prev]
    return out, align
