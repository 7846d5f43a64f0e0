"""Export-time dimensionality reduction of the served embedding (PCA baked into the encoder).

A wider encoder is more robust (issue 10's r16: width 32 beat width 16 at half the epochs), but its 256-d bank
does not fit the artifact size limit. The k-NN vote barely notices a PCA of the bank (recipes.md: validation k-NN
61.8 % at 256-d, 61.3 % at 64-d), so the export fits a PCA on the bank's own embeddings and folds it into the
encoder as one affine layer (`Encoder.reduce`). The ONNX file, the safetensors weights and the bank then all carry
the small embedding, and every attack still differentiates the exact served function. The reduced embedding is
not re-normalised (L2 distances of the PCA coordinates approximate the full embedding's); the manifest says
`normalize: false` for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.models import Encoder, rebuilt


def pca_map(emb: Tensor, dim: int) -> tuple[Tensor, Tensor, float]:
    """The affine map (weight [dim, D], bias [dim]) that centres `emb` [N, D] and projects it on its top `dim`
    principal directions (`emb @ weight.T + bias` are the PCA coordinates), and the share of the variance those
    directions keep, from the same SVD. Deterministic (signs fixed so each direction's largest-magnitude loading
    is positive)."""
    if emb.dim() != 2 or not 1 <= dim <= min(emb.shape):
        raise ValueError(f"need embeddings [N, D] with 1 <= dim <= min(N, D), got {tuple(emb.shape)} and dim {dim}")
    x = emb.double()
    mean = x.mean(0)
    _, sv, vh = torch.linalg.svd(x - mean, full_matrices=False)
    weight = vh[:dim]
    signs = torch.sign(weight.gather(1, weight.abs().argmax(1, keepdim=True)))
    weight = weight * signs
    var = sv**2
    return weight.float(), (-(weight @ mean)).float(), float(var[:dim].sum() / var.sum())


def reduce_encoder(encoder: Encoder, bank: Tensor, dim: int) -> tuple[Encoder, Tensor, float]:
    """A copy of `encoder` that serves the `dim`-d PCA of its embedding (fitted on `bank` [N, D], the encoder's own
    embeddings of the bank images), the bank in that space, and the share of the bank's variance kept. The new
    bank's rows are exactly what the new encoder returns for the same images, up to float rounding."""
    cfg = encoder.cfg
    if cfg.reduce_dim is not None:
        raise ValueError(f"the encoder is already reduced to {cfg.reduce_dim} dimensions")
    if bank.shape[1] != cfg.feature_dim:
        raise ValueError(f"bank rows have {bank.shape[1]} dimensions, the encoder's embedding {cfg.feature_dim}")
    weight, bias, kept = pca_map(bank.float().cpu(), dim)
    reduced = rebuilt(encoder, {"reduce.weight": weight, "reduce.bias": bias}, reduce_dim=dim)
    return reduced, bank.float().cpu() @ weight.T + bias, kept
