"""faiss index types side by side (issue 16): recall, vote agreement, latency, memory and build time.

For each bank (the shipped 45,000-image bank of an artifact, and synthetic banks of N unit vectors drawn
from a 10-class Gaussian mixture in 128-d, like the real embeddings' dimension) every `training.knn.IndexSpec`
type is built and searched with the same queries; `flat` is the reference (exact):

  recall@k        share of the exact k nearest that the index returns (k = 75, the served vote's)
  vote agreement  share of queries whose k-NN vote (the served answer) equals the exact search's
  latency         median ms per search at batch 1 and batch 64 (CPU threads: faiss' default)
  bytes/vector    the serialized index's size over N
  build           seconds to train and fill the index

    python benchmarks/index_types.py --sizes 1000000 --artifact artifacts/default   # writes results/index_types.*
    python benchmarks/index_types.py --sizes 20000 --queries 200 --out /tmp/x      # a quick look
    python benchmarks/index_types.py --sizes 10000000 --nlist 4096 --threads 1 --kinds ivf_flat ivf_pq \
        --queries 500 --out benchmarks/results/index_types_10m                     # 10 M on one core

Memory: the bank is drawn in place (4 bytes x 128 per vector) and one index is alive at a time beside it; an
index's size is read from the file faiss writes (in a temporary folder), not from a copy in memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training import knn

K = 75


def synthetic_bank(n: int, dim: int = 128, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of a Gaussian mixture (class centres at a spread the real bank's k-NN accuracy resembles)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((classes, dim)).astype(np.float32) * 0.35
    labels = rng.integers(0, classes, n)
    x = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, 1 << 20):  # in place, a million rows at a time: no full-size temporaries at 10 M
        part = x[i:i + (1 << 20)]
        rng.standard_normal(part.shape, dtype=np.float32, out=part)
        part += centres[labels[i:i + len(part)]]
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def specs(n: int, dim: int, nlist: int | None = None) -> dict[str, knn.IndexSpec]:
    """Every type with the server's automatic sizes (`knn.auto_index_spec`: nlist ~ 4 sqrt(N) unless given,
    nprobe 1/32 of it), 16-byte PQ, HNSW M=32."""
    return {t: knn.auto_index_spec(n, dim, nlist, index_type=t) for t in knn.INDEX_TYPES}  # type: ignore[arg-type]


def _median_ms(fn: Any, reps: int, budget_s: float = 20.0) -> float:
    """Median ms of `reps` calls, or of those that fit in `budget_s` (at least 3: a 10 M flat search at batch 64
    takes seconds)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def index_bytes(index: Any) -> int:
    """Size of the index as faiss writes it (to a temporary file: a serialized copy in memory would double a
    10 M-vector index)."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def measure(bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, kinds: list[str],
            nlist: int | None = None) -> list[dict[str, Any]]:
    num_classes = int(labels.max()) + 1
    rows, exact_idx, exact_pred = [], None, None
    for name, spec in specs(len(bank), bank.shape[1], nlist).items():
        if name not in kinds and name != "flat":
            continue
        t0 = time.perf_counter()
        index = knn.FaissKnn(bank, labels, num_classes, K, "l2", spec=spec)
        build = time.perf_counter() - t0
        idx = index.search(queries)
        pred, _ = index.predict(queries)
        if exact_idx is None or exact_pred is None:  # flat comes first: the exact reference
            exact_idx, exact_pred = idx, pred
        recall = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(idx.numpy(), exact_idx.numpy(),
                                                                              strict=True)]))
        one, batch = queries[:1], queries[:64]
        rows.append({"index": name, "n": len(bank), "params": {k: v for k, v in vars(spec).items() if k != "type"},
                     "build_s": round(build, 2),
                     "bytes_per_vector": round(index_bytes(index.index) / len(bank), 1),
                     "recall_at_75": round(recall, 4),
                     "vote_agreement": round(float((pred == exact_pred).float().mean()), 4),
                     "ms_batch_1": round(_median_ms(functools.partial(index.search, one), 30), 3),
                     "ms_batch_64": round(_median_ms(functools.partial(index.search, batch), 10), 3)})
        print(json.dumps(rows[-1]), flush=True)
        del index  # one index at a time beside the bank
    return rows


def write(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "index_types.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = ["# faiss index types (issue 16)", "",
             f"{meta['machine']}; load average {meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end; "
             f"{meta['queries']} queries, k = {K}; `python benchmarks/index_types.py {meta['args']}`.", "",
             "| bank | index | params | build s | bytes/vector | recall@75 | vote agreement | ms batch 1 "
             "| ms batch 64 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = ", ".join(f"{k} {v}" for k, v in r["params"].items()
                      if (r["index"].startswith("ivf") and k in ("nlist", "nprobe")) or (r["index"] == "ivf_pq"
                      and k == "pq_m") or (r["index"] == "hnsw" and k in ("hnsw_m", "ef_search")))
        lines.append(f"| {r['bank']} ({r['n']:,}) | {r['index']} | {p or '-'} | {r['build_s']} "
                     f"| {r['bytes_per_vector']} | {r['recall_at_75']:.3f} | {r['vote_agreement']:.3f} "
                     f"| {r['ms_batch_1']} | {r['ms_batch_64']} |")
    (out / "index_types.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000], help="synthetic bank sizes")
    p.add_argument("--artifact", default=None, help="also measure this artifact's real bank")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--kinds", nargs="+", default=["ivf_flat", "ivf_pq", "hnsw"], help="besides flat")
    p.add_argument("--nlist", type=int, help="IVF cells for every bank (default ~4 sqrt(N), a power of two)")
    p.add_argument("--threads", type=int, help="faiss OpenMP threads (default: faiss' own, all cores)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    if a.threads:
        import faiss

        faiss.omp_set_num_threads(a.threads)
    load_start = [round(v, 2) for v in os.getloadavg()]
    rows = []
    if a.artifact:
        from training.artifact import load_artifact

        art = load_artifact(a.artifact)
        bank = np.ascontiguousarray(art.bank.float().numpy())
        labels = art.bank_labels.numpy()
        rng = np.random.default_rng(1)
        q = bank[rng.choice(len(bank), a.queries, replace=False)] + 0.05 * rng.standard_normal(
            (a.queries, bank.shape[1])).astype(np.float32)
        rows += [{"bank": Path(a.artifact).name, **r} for r in measure(bank, labels, q, a.kinds, a.nlist)]
    for n in a.sizes:
        bank, labels = synthetic_bank(n)
        q, _ = synthetic_bank(a.queries, seed=99)
        rows += [{"bank": "synthetic", **r} for r in measure(bank, labels, q, a.kinds, a.nlist)]
        del bank, labels
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"faiss threads {a.threads or 'default'}, "
                       f"torch {torch.__version__}",
            "loadavg_start": load_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "queries": a.queries, "args": " ".join(sys.argv[1:])}
    write(rows, Path(a.out), meta)


if __name__ == "__main__":
    main()
