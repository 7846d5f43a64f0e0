"""The k-NN index a served model votes with: backend choice (faiss CPU/GPU or torch) and construction.

Every backend ends in `training.knn.vote`, so they all give the training library's answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from app.batching import Votes
from training import knn
from training.artifact import Artifact


def _faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_index(setting: str, device: torch.device, index_type: str = "flat") -> str:
    """auto -> faiss-gpu on a GPU build with a GPU, else torch (`knn.TorchKnn`: on a CPU one matmul + top-k
    over the cached bank is 2-3x faster than faiss' flat index at batch 1-64, benchmarks/knn_backends.py).
    An approximate `index_type` exists only in faiss: auto then means faiss-gpu (not for hnsw) or faiss-cpu."""
    faiss = _faiss()
    gpu_ok = faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if index_type != "flat":
        if faiss is None:
            raise RuntimeError(f"index type '{index_type}' (SATML_INDEX_TYPE) needs faiss, which is not installed")
        if setting == "torch":
            raise RuntimeError(f"index type '{index_type}' needs a faiss backend, not SATML_INDEX=torch")
        if setting == "auto":
            return "faiss-gpu" if device.type == "cuda" and gpu_ok and index_type != "hnsw" else "faiss-cpu"
        if setting == "faiss-gpu" and index_type == "hnsw":
            raise RuntimeError("faiss has no GPU HNSW index: use SATML_INDEX=faiss-cpu with SATML_INDEX_TYPE=hnsw")
    if setting == "auto":
        return "faiss-gpu" if device.type == "cuda" and gpu_ok else "torch"
    if setting in ("faiss-cpu", "faiss-gpu") and faiss is None:
        raise RuntimeError(f"index '{setting}' requested (SATML_INDEX) but faiss is not installed")
    if setting == "faiss-gpu" and not (gpu_ok and device.type == "cuda"):
        raise RuntimeError("index 'faiss-gpu' requested but this faiss build or machine has no usable GPU")
    return setting


def build_index(kind: str, art: Artifact, spec: knn.IndexSpec | None = None) -> Callable[[Tensor], Votes]:
    """(pred [B], counts [B, C]) on the CPU from embeddings [B, D]; every backend ends in `knn.vote`."""
    return build_index_over(kind, art.bank, art.bank_labels, art.num_classes, art.k, cast(knn.Metric, art.metric),
                            spec=spec)


def build_index_over(kind: str, bank: Tensor, labels: Tensor, num_classes: int, k: int, metric: knn.Metric,
                     rule: knn.VoteRule | None = None, spec: knn.IndexSpec | None = None) -> Callable[[Tensor], Votes]:
    """`build_index` over any bank (the shipped one plus live additions, app.bank), voting by `rule`
    (`knn.vote_rule`; None: majority); `spec` the faiss index type (torch is always exact)."""
    if kind in ("faiss-cpu", "faiss-gpu"):
        index = knn.FaissKnn(bank.cpu(), labels.cpu(), num_classes, k, metric, use_gpu=kind == "faiss-gpu", rule=rule,
                             spec=spec)
        return index.predict
    index_t = knn.TorchKnn(bank, labels, num_classes, k, metric, rule=rule)  # ValueError on a bad k

    def torch_predict(z: Tensor) -> Votes:
        pred, counts = index_t.predict(z)
        return pred.cpu(), counts.cpu()

    return torch_predict
