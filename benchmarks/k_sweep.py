"""k of the k-NN vote chosen on the validation split (issue 10): clean and PGD accuracy per k, one artifact.

The served k (75) was never chosen on data. This sweeps k over the artifact's own held-out validation split
(rebuilt from its manifest's recorded split, never the bank nor the test set) and reports, per k, the hard
vote's clean accuracy and its accuracy under two PGD attacks on the soft-kNN surrogate: one crafted once on
the whole-bank surrogate (k-independent, so every k is scored on the same adversarial images) and one on a
surrogate restricted to the k nearest (the vote's own k). The robust column is the per-image worst of the
two. A screen, not a verdict: a k picked here ships only after the full suite (`satml robustness`). On the
w32 default the screen ranked k = 20 above 75 on both columns and the suite's temperature-swept and runner-up
surrogates then broke k = 20 far more (worst case under 30 % against 31.4; recipes.md): weaker surrogates than the
suite's under-rank small k. Check a candidate k with the suite itself on the validation split before any test
figure: `satml export ... --k K --out runs/kK` then `satml robustness runs/kK --split validation --n-robust 300`.

    nice python benchmarks/k_sweep.py artifacts/default --k 10 20 50 75 100 150 --out benchmarks/results/k_sweep
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import knn_attacks
from training.artifact import Artifact, load_artifact
from training.data import load_dataset, recorded_validation
from training.evaluate import KnnModel, clean_accuracy, robust_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import emit_result  # a sibling script: the one writer of benchmarks/results


def validation_split(art: Artifact, data: str) -> tuple[np.ndarray, np.ndarray]:
    """The artifact's held-out validation images (uint8 NHWC) and labels, as its training run split them."""
    hp = art.manifest.get("training", {}).get("hyperparameters", {})
    try:
        val = recorded_validation(hp, load_dataset(data, "train"), art.spec.bank_images(int(art.bank.shape[0])),
                                  f"{art.path} with {data}")
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if val is None:
        raise SystemExit(f"{art.path}: the manifest records no split; cannot rebuild its validation images")
    return val.images, np.asarray(val.labels)


def sweep(path: str, data: str, ks: list[int], n_clean: int, n_robust: int, steps: int, eps: float,
          seed: int) -> list[dict[str, Any]]:
    art = load_artifact(path)
    images, labels = validation_split(art, data)
    model = KnnModel.from_artifact(art)
    budget = knn_attacks.Budget(eps, steps, None)
    xr, yr = images[:n_robust], labels[:n_robust]
    shared = knn_attacks.build("pgd_ce", model, budget, knn_attacks.Surrogate(0.1))
    _, adv = robust_mask(model, xr, yr, shared, seed=seed, keep_adversarial=True)
    assert adv is not None
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        mk = KnnModel(model.encoder, model.bank, model.bank_labels, model.num_classes, k, model.metric)
        shared_ok = np.concatenate([(mk.predict(adv[i:i + 500]) == torch.as_tensor(yr[i:i + 500])).numpy()
                                    for i in range(0, len(yr), 500)])
        own = knn_attacks.build("pgd_ce", mk, budget, knn_attacks.Surrogate(0.1, k))
        own_ok, _ = robust_mask(mk, xr, yr, own, seed=seed)
        rows.append({"k": k, "clean": clean_accuracy(mk, images[:n_clean], labels[:n_clean]),
                     "pgd_shared": float(shared_ok.mean()), "pgd_own_k": float(own_ok.mean()),
                     "robust_worst": float((shared_ok & own_ok).mean()), "seconds": time.perf_counter() - t0})
        print(f"k={k}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--data", default="data")
    p.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 35, 50, 75, 100, 150, 250])
    p.add_argument("--n-clean", type=int, default=5000, help="validation images for clean accuracy")
    p.add_argument("--n-robust", type=int, default=500, help="first validation images attacked")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results path without suffix (json + md); unset: stdout only")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("SATML_THREADS", "2")))
    t0 = time.perf_counter()
    rows = sweep(a.artifact, a.data, sorted(set(a.k)), a.n_clean, a.n_robust, a.steps, a.eps, a.seed)
    md = [f"# k of the vote on the validation split: `{a.artifact}`", "",
          f"`python benchmarks/k_sweep.py {a.artifact} --k {' '.join(map(str, sorted(set(a.k))))}` on "
          f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.2f} at the end; {time.perf_counter() - t0:.0f} s. Clean on the first "
          f"{a.n_clean} validation images; PGD-{a.steps} at {a.eps * 255:.0f}/255 on the first {a.n_robust} "
          "(cross-entropy of the soft-kNN surrogate at T = 0.1: whole bank = `shared`, the k nearest = `own k`; "
          "`worst` = per image, both).", "",
          "| k | clean | PGD shared | PGD own k | worst |", "|---:|---:|---:|---:|---:|"]
    md += [f"| {r['k']} | {r['clean']:.1%} | {r['pgd_shared']:.1%} | {r['pgd_own_k']:.1%} | {r['robust_worst']:.1%} |"
           for r in rows]
    result = {"artifact": a.artifact, "steps": a.steps, "eps": a.eps, "n_clean": a.n_clean,
              "n_robust": a.n_robust, "rows": rows, "load_average": os.getloadavg()}
    emit_result(a.out, result, md)


if __name__ == "__main__":
    main()
