"""Screen of a local-mean vote against the served majority vote (issue 10, clean accuracy lever).

Local mean (Mitani & Hamamoto 2006): each class is scored by the mean squared distance from the query's
embedding to its m nearest bank embeddings of that class; the nearest class mean wins. It is differentiable
in the embedding, so it is attacked directly (APGD-CE and APGD-DLR on its own scores, 20 steps) rather
than through a surrogate. The majority vote is attacked as the suite does (APGD on the soft-kNN surrogate,
T = 0.1), i.e. more weakly: the robust columns are a screen, not comparable claims; a vote ships only
after the full suite attacks it. Validation split only (the artifact's held-out images).

    nice python benchmarks/vote_screen.py artifacts/default --m 5 10 20 --n-robust 200
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k_sweep import validation_split  # a sibling script: the artifact's held-out images

from training import attacks, knn, knn_attacks
from training.artifact import load_artifact
from training.evaluate import KnnModel, clean_accuracy, robust_mask


def local_mean_scores(encoder: Callable[[Tensor], Tensor], bank: Tensor, labels: Tensor, num_classes: int,
                      m: int) -> Callable[[Tensor], Tensor]:
    """x -> [B, C] scores: minus the mean squared distance to the m nearest bank embeddings of each class,
    scaled by their batch standard deviation (CE needs a sensible temperature; the argmax does not care)."""
    members = [torch.nonzero(labels == c).squeeze(1) for c in range(num_classes)]

    def scores(x: Tensor) -> Tensor:
        d = torch.cdist(encoder(x), bank) ** 2
        s = -torch.stack([d[:, ix].topk(min(m, len(ix)), largest=False).values.mean(1) for ix in members], 1)
        return s / s.detach().std().clamp_min(1e-6)
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--data", default="data")
    p.add_argument("--m", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--n-robust", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eps", type=float, default=8 / 255)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("SATML_THREADS", "1")))
    art = load_artifact(a.artifact)
    xv, yv = validation_split(art, a.data)
    km = KnnModel.from_artifact(art)
    n = a.n_robust
    x, y = knn.to_float_images(xv[:n]), torch.as_tensor(yv[:n]).long()
    print(f"# {a.artifact}: validation split, clean on {len(yv)}, APGD-{a.steps} at {a.eps * 255:.0f}/255 on the "
          f"first {n}; load average {os.getloadavg()[0]:.2f}")
    print(f"majority k={km.k}: clean {clean_accuracy(km, xv, yv):.4f}", end="")
    for name in ("apgd_ce", "apgd_dlr"):
        attack = knn_attacks.build(name, km, knn_attacks.Budget(a.eps, a.steps, None), knn_attacks.Surrogate(0.1))
        print(f", {name} (surrogate) {robust_mask(km, xv[:n], yv[:n], attack)[0].mean():.4f}", end="")
    print(flush=True)
    for m in a.m:
        f = local_mean_scores(art.encoder, art.bank, art.bank_labels, art.num_classes, m)
        with torch.no_grad():
            right = sum(int((f(knn.to_float_images(xv[i:i + 500])).argmax(1) == torch.as_tensor(yv[i:i + 500])).sum())
                        for i in range(0, len(yv), 500))
        ok = torch.ones(n, dtype=torch.bool)
        line = f"local mean m={m}: clean {right / len(yv):.4f}"
        for name, atk in (("apgd_ce", attacks.apgd_ce), ("apgd_dlr", attacks.apgd_dlr)):
            xa = torch.cat([atk(f, x[i:i + 100], y[i:i + 100], eps=a.eps, steps=a.steps, model=art.encoder)
                            for i in range(0, n, 100)])
            with torch.no_grad():
                r = f(xa).argmax(1) == y
            ok &= r
            line += f", {name} {r.float().mean():.4f}"
        print(line + f", worst of the two {ok.float().mean():.4f}", flush=True)


if __name__ == "__main__":
    main()
