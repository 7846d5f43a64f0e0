"""k-NN backends side by side (issue 17): which exact search is fastest per batch size on this machine?

Times search + vote over an artifact's real bank for each backend and batch size, in one run, and
checks that every backend gives the same votes as the reference `training.knn.knn_predict`. Queries
are the bank's own embeddings plus noise (realistic neighbourhoods, not uniform random vectors).
Backends: `faiss` (IndexFlatL2 / IP, what the server used), `torch` (`knn.knn_predict`, the reference),
`torch-bank` (`knn.TorchKnn`: the same formula with the bank's norms and transpose kept, the product's layout
chosen by batch size and embedding width), `torch-one-layout` (the same formula always as q @ bank^T through a
transposed view, what `knn_search` did before it chose the layout), `torch-bank-major` (2-16 queries always as
bank @ q^T, what it did before it looked at the width): the before/after ratios of those changes.
`--synthetic-dim D` replaces the artifact's bank by random unit vectors of D dimensions (same size and labels),
to see where the layouts cross over.

    python benchmarks/knn_backends.py --artifact artifacts/default [--threads 2] [--seconds 1]
    python benchmarks/knn_backends.py --synthetic-dim 128 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch  # before faiss

from training import knn
from training.artifact import load_artifact

ROOT = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], object], seconds: float) -> float:
    """Median seconds per call over at least `seconds` (and 5 calls), after one warm-up call."""
    fn()
    out: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(out) < 5:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "default")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seconds", type=float, default=1.0, help="measuring time per backend and batch size")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--synthetic-dim", type=int, help="random unit-vector bank of this width instead of the artifact's")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    art = load_artifact(a.artifact, "cpu")
    bank, labels = art.bank.float().contiguous(), art.bank_labels.long()
    if a.synthetic_dim:
        bank = torch.nn.functional.normalize(torch.randn(len(bank), a.synthetic_dim,
                                                         generator=torch.Generator().manual_seed(1)), dim=1)
    metric, c, k = art.metric, art.num_classes, art.k
    backends: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
        "torch": lambda q: knn.knn_predict(q, bank, labels, c, k, metric),  # type: ignore[arg-type]
        "torch-bank": knn.TorchKnn(bank, labels, c, k, metric).predict,  # type: ignore[arg-type]
    }
    if metric == "l2":
        sq = bank.pow(2).sum(1)[None]

        def one_layout(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.addmm(sq, q, bank.t(), alpha=-2).topk(k, dim=1, largest=False).indices
            return knn.vote(labels[idx], c)

        backends["torch-one-layout"] = one_layout
        bank_sq, bank_t = sq[0], bank.t().contiguous()

        def bank_major(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = (torch.addmm(bank_sq[:, None], bank, q.t(), alpha=-2).t().contiguous() if 2 <= len(q) <= 16
                 else torch.addmm(sq, q, bank_t, alpha=-2))
            return knn.vote(labels[s.topk(k, dim=1, largest=False).indices], c)

        backends["torch-bank-major"] = bank_major
    try:
        import faiss

        faiss.omp_set_num_threads(a.threads)
        backends["faiss"] = knn.FaissKnn(bank, labels, c, k, metric).predict  # type: ignore[arg-type]
    except ImportError:
        print("faiss not installed: skipped", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    result: dict[str, object] = {"artifact": f"synthetic {a.synthetic_dim}-d" if a.synthetic_dim else str(a.artifact),
                                 "bank": list(bank.shape), "k": k, "metric": metric,
                                 "threads": a.threads, "torch": torch.__version__,
                                 "loadavg_at_start": list(os.getloadavg()), "per_batch": {}}
    rows = result["per_batch"]
    assert isinstance(rows, dict)
    print(f"bank {tuple(bank.shape)}, k={k}, {metric}, {a.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} " + " ".join(f"{n + ' img/s (ms)':>24}" for n in backends) + "  votes equal to torch")
    for b in (int(x) for x in a.batches.split(",")):
        idx = torch.randint(len(bank), (b,), generator=g)
        q = bank[idx] + 0.05 * bank.std() * torch.randn(b, bank.shape[1], generator=g)
        ref = backends["torch"](q)
        row = {}
        for name, fn in backends.items():
            s = timed(functools.partial(fn, q), a.seconds)
            pred, counts = fn(q)
            row[name] = {"ms": round(1000 * s, 3), "images_per_s": round(b / s, 1),
                         "same_votes": bool(torch.equal(pred, ref[0]) and torch.equal(counts, ref[1]))}
        rows[str(b)] = row
        print(f"{b:>5} " + " ".join(f"{r['images_per_s']:.0f} ({r['ms']:.2f})".rjust(24) for r in row.values())
              + "  " + ", ".join(f"{n}={r['same_votes']}" for n, r in row.items()))
    result["loadavg_at_end"] = list(os.getloadavg())
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
