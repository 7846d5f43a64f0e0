"""What the bank alone can add to clean k-NN accuracy (issue 10): PCA width x a mirror-image bank, validation only.

The served bank holds one embedding per training image at 48 dimensions (a PCA baked into the encoder, chosen
for the 15 MB artifact limit). This screen asks, from a robust checkpoint and its own validation split (never
the test set), how much clean accuracy the hard majority vote gains from a wider PCA and from adding the
embeddings of the horizontally mirrored bank images (twice the rows, the labels repeated), both of which cost
artifact bytes and none of which needs training; and, at the served size and search cost, one row per image that
is the mean of its embedding and its mirror image's. The PCA is fitted on the bank rows (original images, or
original and mirrored: `pca_on_flip`), embeddings round-trip through float16 as the shipped bank does. Clean
only: a change chosen here still needs the suite (`satml robustness --split validation`) before any test figure.

    nice python benchmarks/bank_screen.py runs/r19/robust/checkpoint.pt --out benchmarks/results/bank_screen_r19
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.data import load_split, mirrored
from training.export import _checkpoint_parts, split_of
from training.knn import embed, knn_predict
from training.reduce import pca_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import emit_result  # a sibling script: the one writer of benchmarks/results


def screen(checkpoint: str, data: str, dims: list[int], k: int) -> list[dict[str, Any]]:
    encoder, ckpt, _ = _checkpoint_parts(checkpoint, torch.device("cpu"))
    bank_ds, val = load_split(data, split_of(ckpt["config"]))
    if val is None:
        raise SystemExit(f"{checkpoint}: the run kept no validation split")
    bank, bank_flip = embed(encoder, bank_ds.images, progress=True), embed(encoder, mirrored(bank_ds.images))
    query = embed(encoder, val.images)
    yb, yv = torch.as_tensor(bank_ds.labels).long(), torch.as_tensor(val.labels).long()
    classes = len(bank_ds.classes)
    rows = []
    for dim in [*dims, None]:  # None: the full (normalised) embedding, no PCA
        for pca_on_flip in ([False] if dim is None else [False, True]):
            if dim is None:
                weight, bias = torch.eye(bank.shape[1]), torch.zeros(bank.shape[1])
            else:
                weight, bias, _ = pca_map(torch.cat([bank, bank_flip]) if pca_on_flip else bank, dim)

            def project(x: Tensor, w: Tensor = weight, b: Tensor = bias) -> Tensor:
                return (x @ w.T + b).half().float()
            q = project(query)
            one = (knn_predict(q, project(bank), yb, classes, k)[0] == yv).float().mean().item()
            both = knn_predict(q, torch.cat([project(bank), project(bank_flip)]), torch.cat([yb, yb]), classes, k)
            mean = knn_predict(q, project((bank + bank_flip) / 2), yb, classes, k)[0]  # one row per image
            rows.append({"dim": dim or bank.shape[1], "pca_on_flip": pca_on_flip, "bank": one,
                         "bank_and_mirror": (both[0] == yv).float().mean().item(),
                         "bank_mirror_mean": (mean == yv).float().mean().item()})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a training checkpoint (the encoder before the export's PCA)")
    p.add_argument("--data", default="data")
    p.add_argument("--dims", type=int, nargs="+", default=[48, 64, 96, 128])
    p.add_argument("--k", type=int, default=75)
    p.add_argument("--out", default=None, help="results path without suffix (json + md); unset: stdout only")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("SATML_THREADS", "1")))
    t0 = time.perf_counter()
    rows = screen(a.checkpoint, a.data, a.dims, a.k)
    md = [f"# The bank alone: PCA width x mirrored bank images (`{a.checkpoint}`)", "",
          f"`python benchmarks/bank_screen.py {a.checkpoint}` on {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.2f} at the end; "
          f"{time.perf_counter() - t0:.0f} s. Clean hard-vote accuracy (k = {a.k}, majority) on the run's "
          "validation split; bank rows float16 as shipped.", "",
          "| dims | PCA fitted on | bank | bank + mirrored bank (2x rows) | mean of image and mirror (1x rows) |",
          "|---:|---|---:|---:|---:|"]
    md += [f"| {r['dim']} | {'bank + mirrored' if r['pca_on_flip'] else 'bank'} | {r['bank']:.2%} | "
           f"{r['bank_and_mirror']:.2%} | {r['bank_mirror_mean']:.2%} |" for r in rows]
    result = {"checkpoint": a.checkpoint, "k": a.k, "rows": rows, "load_average": os.getloadavg()}
    emit_result(a.out, result, md)


if __name__ == "__main__":
    main()
