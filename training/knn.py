"""k-nearest-neighbour classification over an embedding bank: torch and faiss, one vote.

The paper (Chen et al. 2020) classifies by an unweighted majority vote of the k = 75 nearest
training embeddings under Euclidean distance. Both backends find neighbours, then share `vote`.
`soft_knn_logits` is the differentiable surrogate that adaptive attacks need, because hard votes
have zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Metric = Literal["l2", "cosine"]


Vote = Literal["majority", "capped", "prior"]
VOTES: tuple[str, ...] = ("majority", "capped", "prior")
PRIOR_POWER = 1.0  # the `prior` vote's exponent, chosen on the validation split (benchmarks/few_shot.py --choose)


@dataclass(frozen=True, eq=False)
class VoteRule:
    """How the k neighbours' labels become a prediction: each class counts at most `cap` of them, then the
    class with the highest count x `weights[c]` wins. The default (no cap, no weights) is the paper's majority."""

    cap: int | None = None
    weights: Tensor | None = None  # [C] float64; None: all 1

    @property
    def majority(self) -> bool:
        return self.cap is None and self.weights is None


def vote(neighbor_labels: Tensor, num_classes: int, cap: int | None = None,
         weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Majority vote of the k neighbours; with `cap`, each class counts at most `cap` of them; with `weights`
    ([C]), the class with the highest count x weight wins (the counts returned stay the raw votes).

    neighbor_labels: [B, k] int64; -1 marks a missing neighbour (an approximate index that found fewer than k),
    which casts no vote. Returns (pred [B], counts [B, C]), counts after the cap. Ties go to the class of the
    nearest neighbour among the tied classes (deterministic, and what a 1-NN would say); a query with no
    neighbour at all gets class 0 and zero counts. `cap=None` (or cap >= k) and no weights is the paper's
    unweighted majority vote; see `class_cap` and `prior_weights` for why the others.
    """
    b, k = neighbor_labels.shape
    present = neighbor_labels >= 0
    labels = neighbor_labels.clamp_min(0)
    counts = torch.zeros(b, num_classes, dtype=torch.long, device=neighbor_labels.device)
    counts.scatter_add_(1, labels, present.long())
    if cap is not None and cap < k:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        counts = counts.clamp_max(cap)
    score = counts if weights is None else counts.double() * weights.to(counts.device, torch.float64)
    tied = score == score.amax(dim=1, keepdim=True)  # B x C
    # rank of each neighbour among the tied classes: first (nearest) tied neighbour wins
    is_tied = tied.gather(1, labels) & present  # B x k
    first = torch.where(is_tied, torch.arange(k, device=neighbor_labels.device), k).argmin(dim=1)
    pred = labels.gather(1, first[:, None]).squeeze(1) * is_tied.any(1)
    return pred, counts


def class_cap(bank_labels: Tensor, num_classes: int, k: int) -> int:
    """The cap of the `capped` vote for a bank: its smallest class (classes with no example left out), at
    most k. A class of n examples can never hold more than n of the k votes, so no class may count more
    than the smallest can reach: 10 examples of a new class then compete on equal terms with 4,500 of an old
    one (ties by the nearest neighbour). A bank whose every class has >= k examples gets cap k: exactly the
    majority vote."""
    sizes = torch.bincount(bank_labels.long().cpu(), minlength=num_classes)
    present = sizes[sizes > 0]
    return int(min(k, int(present.min()) if len(present) else k))


def prior_weights(bank_labels: Tensor, num_classes: int, power: float = PRIOR_POWER) -> Tensor | None:
    """The `prior` vote's class weights, float64 [C]: max(1, largest class size / (2 x class size)) ** power,
    so classes at least half as large as the largest count as equals; None when every class does (the vote is
    then exactly the majority vote: CIFAR-10's bank of 45,000 has 4,468-4,525 per class).

    k-NN estimates p(x | c) by count_c / n_c, so the majority vote (count_c alone) weighs each class by its
    share of the bank: 10 examples added live never outvote 4,500. power = 1 gives the small classes the
    prior of a class half as large as the largest (one neighbour among 10 examples counts 225 votes of a
    4,500-example class), power = 0 is the majority vote; 1 (tied with 0.875) maximised the mean per-class
    accuracy of the validation split with two classes re-added from 1-50 examples (benchmarks/few_shot.py)."""
    sizes = torch.bincount(bank_labels.long().cpu(), minlength=num_classes).double()
    ratio = (sizes.max() / (2 * sizes.clamp_min(1))).clamp_min(1)
    if bool((ratio[sizes > 0] == 1).all()):
        return None
    return ratio**power


def vote_rule(kind: str, bank_labels: Tensor, num_classes: int, k: int) -> VoteRule:
    """The `VoteRule` of a vote kind over a bank: `majority`, `capped` (`class_cap`) or `prior`
    (`prior_weights`); a rule that cannot differ from the majority vote on this bank is the majority rule."""
    if kind == "majority":
        return VoteRule()
    if kind == "capped":
        cap = class_cap(bank_labels, num_classes, k)
        return VoteRule(cap=cap if cap < k else None)
    if kind == "prior":
        return VoteRule(weights=prior_weights(bank_labels, num_classes))
    raise ValueError(f"vote must be one of {VOTES}, got {kind!r}")


def _distances(query: Tensor, bank: Tensor, metric: Metric) -> Tensor:
    """[B, N]: squared Euclidean distance, or 1 - cosine similarity."""
    if metric == "cosine":
        return 1 - F.normalize(query, dim=1) @ F.normalize(bank, dim=1).t()
    return (query.pow(2).sum(1, keepdim=True) - 2 * query @ bank.t() + bank.pow(2).sum(1)[None]).clamp_min(0)


SMALL_BATCH = 16  # knn_search: 2 to this many queries of a wide bank run fastest as the bank-major product
WIDE_BANK = 64  # embedding widths above this are "wide" (128-d, 256-d); the default model's 48-d is not


def knn_search(query: Tensor, bank: Tensor, k: int, metric: Metric = "l2", chunk: int = 1024,
               bank_sq: Tensor | None = None, bank_t: Tensor | None = None) -> Tensor:
    """Indices [B, k] of the k nearest bank rows, nearest first (exact, chunked over the queries).

    Ranks by ||b||^2 - 2 q.b (l2; the query's own norm does not change the order) or by q.b of the
    normalised vectors (cosine): one matmul and a top-k, the cheapest exact search on a CPU at the batch
    sizes a server sees (benchmarks/knn_backends.py). `bank_sq` caches ||b||^2 and `bank_t` a contiguous
    [D, N] copy of the bank (TorchKnn keeps both). The product's layout follows the shape, as measured on a
    45,000-row bank at 1 and 2 threads (benchmarks/README.md, results/knn_layout_*.json): one query (two of a
    narrow bank) against the contiguous transpose; 2-16 queries of a wide bank as bank @ q^T (the bank read once,
    row-major); everything else through the transposed view. Every layout ranks by the same formula, so only
    float rounding differs between them.
    """
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}] (bank size), got {k}")
    bank = bank.to(query.dtype)
    if metric == "cosine":
        bank_n = F.normalize(bank, dim=1)
        out = [(F.normalize(q, dim=1) @ bank_n.t()).topk(k, dim=1).indices for q in query.split(chunk)]
        return torch.cat(out)
    sq = bank.pow(2).sum(1) if bank_sq is None else bank_sq.to(query.dtype)
    bt = bank.t() if bank_t is None else bank_t.to(query.dtype)

    def scores(q: Tensor) -> Tensor:  # [b, N]: ||bank||^2 - 2 q.bank
        b, wide = len(q), bank.shape[1] > WIDE_BANK
        if b == 1 or (b == 2 and not wide):
            return torch.addmm(sq[None], q, bt, alpha=-2)
        if wide and b <= SMALL_BATCH:
            return torch.addmm(sq[:, None], bank, q.t(), alpha=-2).t().contiguous()
        return torch.addmm(sq[None], q, bank.t(), alpha=-2)

    return torch.cat([scores(q).topk(k, dim=1, largest=False).indices for q in query.split(chunk)])


def knn_predict(
    query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 75, metric: Metric = "l2"
) -> tuple[Tensor, Tensor]:
    """Hard k-NN classification. query [B, D], bank [N, D], bank_labels [N] -> (pred [B], counts [B, C])."""
    idx = knn_search(query, bank, k, metric)
    return vote(bank_labels.to(idx.device)[idx], num_classes)


def soft_knn_logits(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    temperature: float = 0.1,
    k: int | None = None,
    metric: Metric = "l2",
) -> Tensor:
    """Differentiable k-NN surrogate: log of softmax(-d / T)-weighted class votes, [B, C].

    With k, only the k nearest bank rows vote (as the hard classifier); without, the whole bank.
    Small T approaches the hard 1-NN; larger T smooths toward class prototypes.
    """
    if not temperature > 0:  # also rejects NaN, which would give NaN logits silently
        raise ValueError(f"temperature must be > 0, got {temperature}")
    d = _distances(query, bank.to(query.dtype), metric)  # B x N
    labels = bank_labels.to(query.device)
    if k is not None:
        d, idx = d.topk(k, dim=1, largest=False)  # B x k
        labels = labels[idx]
    else:
        labels = labels.expand(d.shape[0], -1)
    w = torch.softmax(-d / temperature, dim=1)  # B x (k|N)
    probs = torch.zeros(d.shape[0], num_classes, dtype=w.dtype, device=w.device).scatter_add(1, labels, w)
    return torch.log(probs.clamp_min(1e-12))


class SoftKnnClassifier(nn.Module):
    """Encoder + bank as a differentiable classifier (logits), the surrogate for adaptive attacks."""

    def __init__(
        self,
        encoder: nn.Module,
        bank: Tensor,
        bank_labels: Tensor,
        num_classes: int,
        temperature: float = 0.1,
        k: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.bank: Tensor
        self.bank_labels: Tensor
        self.register_buffer("bank", bank.float())
        self.register_buffer("bank_labels", bank_labels.long())
        self.num_classes, self.temperature, self.k = num_classes, temperature, k

    def forward(self, x: Tensor) -> Tensor:
        z = self.encoder(x)
        return soft_knn_logits(z, self.bank, self.bank_labels, self.num_classes, self.temperature, self.k)


def other_class_guides(z: Tensor, labels: Tensor, bank: Tensor, bank_labels: Tensor, m: int) -> Tensor:
    """For the paper's guided attack: the m nearest bank embeddings of a class other than each label.

    z [B, D], labels [B], bank [N, D], bank_labels [N] -> [B, m', D], m' = m capped at the fewest other-class
    samples any query has (a small bank must not pad the guides with same-class samples).
    """
    d = _distances(z, bank.to(z.dtype), "l2")  # B x N
    same = labels[:, None] == bank_labels[None].to(labels.device)
    d = d.masked_fill(same, float("inf"))
    m = max(1, min(m, int((~same).sum(1).min())))
    idx = d.topk(m, dim=1, largest=False).indices  # B x m
    return bank.to(z.dtype)[idx]


@torch.no_grad()
def embed(
    encoder: Callable[[Tensor], Tensor],
    images: np.ndarray | Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Embeddings [N, D] (float32, on CPU) of images: uint8 [N, H, W, 3] or float [N, 3, H, W] in [0, 1]."""
    from tqdm.auto import tqdm

    was_training = getattr(encoder, "training", False)
    if isinstance(encoder, nn.Module):
        encoder.eval()
    out = []
    try:
        for i in tqdm(range(0, len(images), batch_size), desc="embed", disable=not progress, leave=False):
            out.append(encoder(to_float_images(images[i : i + batch_size], device)).float().cpu())
    finally:
        if isinstance(encoder, nn.Module):
            encoder.train(was_training)
    return torch.cat(out)


def to_float_images(images: np.ndarray | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 NHWC (numpy or tensor) -> float NCHW in [0, 1]; float NCHW passes through."""
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        return t.to(device).permute(0, 3, 1, 2).float().div_(255)
    return t.to(device).float()


class TorchKnn:
    """Exact k-NN with torch over a bank held once (its squared norms and a contiguous transpose cached): the
    same search as `knn_predict` without recomputing the bank's norms per call."""

    def __init__(self, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 75,
                 metric: Metric = "l2", rule: VoteRule | None = None) -> None:
        if not 1 <= k <= bank.shape[0]:
            raise ValueError(f"k must be in [1, {bank.shape[0]}] (bank size), got {k}")
        self.bank = bank.float().contiguous()
        self.bank_sq = self.bank.pow(2).sum(1)
        self.bank_t = self.bank.t().contiguous()  # [D, N]: the fast layout for one query (knn_search)
        self.labels = bank_labels.long().to(bank.device)
        self.num_classes, self.k, self.metric, self.rule = num_classes, k, metric, rule or VoteRule()

    def search(self, query: Tensor) -> Tensor:
        """Neighbour indices [B, k], nearest first."""
        return knn_search(query.to(self.bank.device).float(), self.bank, self.k, self.metric, bank_sq=self.bank_sq,
                          bank_t=self.bank_t)

    def predict(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """(pred [B], counts [B, C]) exactly as `knn_predict` (under `rule`: `vote`'s cap and weights)."""
        return vote(self.labels[self.search(query)], self.num_classes, self.rule.cap, self.rule.weights)


IndexType = Literal["flat", "ivf_flat", "ivf_pq", "hnsw"]
INDEX_TYPES: tuple[str, ...] = ("flat", "ivf_flat", "ivf_pq", "hnsw")


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index searches a bank: `flat` is exact (every other type trades recall for speed or memory
    on banks far beyond the shipped 45,000; benchmarks/index_types.py measures the trade)."""

    type: IndexType = "flat"
    nlist: int = 1024  # ivf_*: coarse cells (faiss advises 4 sqrt(N) to 16 sqrt(N)); capped at N / 39
    nprobe: int = 32  # ivf_*: cells searched per query
    pq_m: int = 16  # ivf_pq: sub-quantisers, i.e. bytes per vector (8-bit codes); must divide the dimension
    hnsw_m: int = 32  # hnsw: links per node
    ef_search: int = 128  # hnsw: candidates kept per query (raised to k when smaller)

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}, got {self.type!r}")
        if min(self.nlist, self.nprobe, self.pq_m, self.hnsw_m, self.ef_search) < 1:
            raise ValueError(f"index parameters must be positive, got {self}")


FLAT_MAX = 200_000  # auto: exact search up to this many vectors (flat at 1 M: 69 ms per query on 2 cores)
PQ_MIN = 20_000_000  # auto: product-quantised codes from here (flat storage: 512 bytes per 128-d vector, PQ 24)


def auto_nlist(n: int) -> int:
    """IVF cells for n vectors: the power of two nearest 4 sqrt(n) (faiss' advice: 4-16 sqrt(n)), at least 16."""
    return int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(n)))))


def auto_index_spec(n: int, dim: int, nlist: int | None = None, nprobe: int | None = None,
                    pq_m: int = 16, hnsw_m: int = 32, ef_search: int = 128,
                    index_type: IndexType | Literal["auto"] = "auto") -> IndexSpec:
    """The index for a bank of n vectors of `dim` dimensions, chosen from benchmarks/results/index_types*.md when
    `index_type` is auto: exact `flat` up to FLAT_MAX vectors; `ivf_flat` above (k-NN vote agreement with flat
    99.2 % at 1 M and 99.4 % at 10 M, 5.6 ms per query against 215 ms at 10 M on one core); `ivf_pq` from PQ_MIN
    (99.2 % at 10 M in 24 bytes per vector instead of 520) when `pq_m` divides `dim`. nlist None: `auto_nlist(n)`;
    nprobe None: nlist / 32."""
    if index_type == "auto":
        index_type = "flat" if n <= FLAT_MAX else "ivf_pq" if n >= PQ_MIN and dim % pq_m == 0 else "ivf_flat"
    cells = nlist or auto_nlist(n)
    return IndexSpec(index_type, cells, nprobe or max(1, cells // 32), pq_m, hnsw_m, ef_search)


def build_faiss_index(vecs: np.ndarray, spec: IndexSpec, metric: Metric, k: int) -> Any:
    """A trained, filled faiss CPU index over float32 vecs [N, D] (normalised already for cosine)."""
    import faiss  # optional dependency: training works without it

    n, d = vecs.shape
    inner = metric == "cosine"
    fmetric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
    index: Any
    if spec.type == "flat":
        index = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
    elif spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, fmetric)
        index.hnsw.efSearch = max(spec.ef_search, k)
    else:
        nlist = max(1, min(spec.nlist, n // 39))  # faiss' k-means wants >= 39 points per cell
        quantizer = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
        if spec.type == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, fmetric)
        else:
            if d % spec.pq_m:
                raise ValueError(f"ivf_pq: pq_m={spec.pq_m} must divide the embedding dimension {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, spec.pq_m, 8, fmetric)
        sample = vecs if n <= 256 * nlist else vecs[np.random.default_rng(0).choice(n, 256 * nlist, replace=False)]
        index.train(sample)
        index.nprobe = min(spec.nprobe, nlist)
    index.add(vecs)
    return index


class FaissKnn:
    """k-NN with faiss (exact flat index, or an approximate `IndexSpec` type; GPU when requested and available),
    same vote as torch. An approximate index may find fewer than k neighbours; the missing ones cast no vote."""

    def __init__(self, bank: Tensor | np.ndarray, bank_labels: Tensor | np.ndarray, num_classes: int,
                 k: int = 75, metric: Metric = "l2", use_gpu: bool = False, rule: VoteRule | None = None,
                 spec: IndexSpec | None = None) -> None:
        import faiss  # optional dependency: training works without it

        spec = spec or IndexSpec()
        vecs = np.ascontiguousarray(torch.as_tensor(bank).float().numpy())
        if metric == "cosine":
            vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
        if not 1 <= k <= len(vecs):
            raise ValueError(f"k must be in [1, {len(vecs)}] (bank size), got {k}")
        index = build_faiss_index(vecs, spec, metric, k)
        self.on_gpu, self.spec = False, spec
        if use_gpu:
            if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
                raise RuntimeError("faiss GPU index requested but this faiss build has no usable GPU")
            if spec.type == "hnsw":
                raise RuntimeError("faiss has no GPU HNSW index: use SATML_INDEX=faiss-cpu with hnsw")
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
            self.on_gpu = True
        self.index, self.metric, self.k, self.num_classes = index, metric, k, num_classes
        self.rule = rule or VoteRule()
        self.labels = torch.as_tensor(bank_labels).long()

    def search(self, query: Tensor | np.ndarray) -> Tensor:
        """Neighbour indices [B, k], nearest first."""
        q = np.ascontiguousarray(torch.as_tensor(query).detach().float().cpu().numpy())
        if self.metric == "cosine":
            q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        _, idx = self.index.search(q, self.k)
        return torch.from_numpy(idx).long()  # -1 where an approximate index found fewer than k

    def predict(self, query: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """(pred [B], counts [B, C]) exactly as `knn_predict` (under `rule`: `vote`'s cap and weights)."""
        idx = self.search(query)
        labels = torch.where(idx >= 0, self.labels[idx.clamp_min(0)], -1)  # a missing neighbour casts no vote
        return vote(labels, self.num_classes, self.rule.cap, self.rule.weights)
