"""Label-free pseudo-labels: k-means clusters of a frozen SSL teacher's embeddings (issue 10).

Why: the labelled PGD-AT reference (cnn8 width 16, 8 epochs) reached 31.4 % validation PGD-10 where the
label-free embedding distillation at the same width stays at 26-27 %: adversarial training against class
boundaries buys more vote robustness per CPU-minute than keeping embeddings still. Clusters of the
teacher's embedding give such boundaries without a single label (the `pseudo_at` method trains PGD-AT
on them); with many more clusters than classes, most real class boundaries are among the cluster
boundaries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import knn


def spherical_kmeans(z: Tensor, k: int, *, iters: int = 30, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means under cosine similarity on the rows of z [N, D]: (unit centroids [k, D], assignment [N]).

    Seeded k-means++ start (each new centroid drawn with probability growing with its squared distance to the
    nearest chosen one), so a resumed run recomputes the same clusters; a cluster that empties is re-seeded
    with the row its centroid explains worst."""
    if not 1 <= k <= len(z):
        raise ValueError(f"k must be in [1, {len(z)}] (rows), got {k}")
    z = F.normalize(z.float(), dim=1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(len(z), (1,), generator=g))
    chosen, nearest = [first], z @ z[first]
    for _ in range(k - 1):
        d2 = (2 - 2 * nearest).clamp_min(0).cpu().double()  # squared distance of unit vectors
        nxt = int(torch.multinomial(d2 / d2.sum(), 1, generator=g)) if d2.sum() > 0 else int(torch.randint(
            len(z), (1,), generator=g))
        chosen.append(nxt)
        nearest = torch.maximum(nearest, z @ z[nxt])
    c = z[torch.tensor(chosen, device=z.device)].clone()
    for _ in range(iters):
        sim = z @ c.t()
        best, assign = sim.max(1)
        counts = torch.bincount(assign, minlength=k)
        c = F.normalize(torch.zeros_like(c).index_add_(0, assign, z), dim=1)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            c[empty] = z[best.argsort()[: len(empty)]]
    return c, (z @ c.t()).argmax(1)


def soft_assignment(z: Tensor, centroids: Tensor, temperature: float) -> Tensor:
    """[N, k] rows summing to 1: softmax over the cosine of each row of z to each unit centroid, divided by the
    temperature. Its argmax is the hard k-means id; as the temperature falls it approaches the one-hot id."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(F.normalize(z.float(), dim=1) @ centroids.float().t() / temperature, dim=1)


@torch.no_grad()
def teacher_pseudo_labels(teacher: nn.Module, images: np.ndarray, k: int, *, seed: int = 0,
                          device: torch.device | str = "cpu", soft: float = 0.0) -> Tensor:
    """Cluster ids [N] (int64, CPU) of uint8 NHWC images under the teacher's embedding; with `soft` > 0 the
    teacher's soft assignment [N, k] (float32, CPU) at that temperature instead (`soft_assignment`)."""
    z = knn.embed(teacher, images, device=device)
    centroids, assign = spherical_kmeans(z, k, seed=seed)
    return soft_assignment(z, centroids, soft).cpu() if soft > 0 else assign.cpu()


def hard_ids(targets: Tensor) -> Tensor:
    """Cluster ids [N] of pseudo-label targets: the ids themselves, or the argmax of soft assignments [N, k]."""
    return targets.argmax(1) if targets.dim() == 2 else targets


def purity(assign: Tensor, labels: Tensor) -> float:
    """Share of images whose cluster's majority label is their own (a diagnostic; training never sees labels)."""
    k, c = int(assign.max()) + 1, int(labels.max()) + 1
    table = torch.zeros(k, c, dtype=torch.long).index_put_((assign.cpu(), labels.cpu()), torch.ones(len(assign),
                                                            dtype=torch.long), accumulate=True)
    return float(table.max(1).values.sum()) / max(1, len(assign))


RECORD = "pseudo_labels.npy"  # in the run folder: the cluster ids the run started with
MIN_AGREEMENT = 0.999  # a resumed run's ids may differ on a handful of boundary images (another CPU's float sums)


def check_or_record(path: Path, ids: Tensor, *, resuming: bool, write: bool = True,
                    min_agreement: float = MIN_AGREEMENT) -> float:
    """A run's cluster ids [N] against those it started with (`path`, a .npy array). A fresh start (or a resumed
    run without a record: one started before records existed) records them (when `write`); a resumed run must agree
    on at least `min_agreement` of the images, else ValueError: its targets would change under its weights mid-run
    (another teacher, seed, data, or a k-means that drifted on another machine). Returns the agreement (1.0 when
    recorded)."""
    ids = ids.detach().cpu().long()
    if not resuming or not path.is_file():
        if write:
            np.save(path, ids.numpy().astype(np.int32))
        return 1.0
    first = torch.from_numpy(np.load(path, allow_pickle=False)).long()
    if first.shape != ids.shape:
        raise ValueError(f"{path}: the run started with cluster ids for {tuple(first.shape)} images, now "
                         f"{tuple(ids.shape)}: not the same data")
    agreement = float((first == ids).float().mean()) if len(ids) else 1.0
    if agreement < min_agreement:
        raise ValueError(f"{path}: the recomputed clusters agree with those the run started with on only "
                         f"{agreement:.2%} of the images (needs {min_agreement:.1%}): resuming would change the "
                         "targets under the trained weights; start a new run folder instead")
    return agreement
