"""Open-set check of conformal credibility (issue 14): are images of classes the bank lacks rejected?

The artifact's bank loses two classes (default: cat and truck; their rows removed, the class list kept, so
they can never be voted for). Calibration scores are recomputed from the artifact's own held-out validation
split, known classes only (the calibration the server would hold for that bank). Each test image then gets a
credibility (p-value of the predicted class, `training.conformal.trust`) and, as the naive baseline, the
vote share of the winning class. Reported per artifact: AUROC of telling the known classes' test images
(positive) from the held-out classes' (negative) by each score, and the share of held-out images rejected at
the credibility threshold that answers 90 % of the known-class test images. The encoder is the artifact's,
unchanged: it saw the held-out classes unlabelled in training (a weaker open-set test than truly unseen
classes; said so in the report).

    nice python benchmarks/open_set.py artifacts/default artifacts/ssl artifacts/supervised
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training import conformal, knn
from training.artifact import load_artifact
from training.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k_sweep import validation_split  # a sibling script: the artifact's own held-out split
from serve_bench import write_result  # the one writer of benchmarks/results

HELD_OUT = ("cat", "truck")
COVERAGE = 0.9


@dataclass(frozen=True)
class Embedded:
    """Embeddings [N, D] and labels [N] of one split."""

    z: Tensor
    y: Tensor


def open_set(bank: Embedded, val: Embedded, test: Embedded, held: list[int], num_classes: int, k: int,
             coverage: float = COVERAGE) -> dict[str, float]:
    """Credibility and vote-share AUROC (known-class test images vs held-out-class ones) over the bank without
    the `held` classes, calibrated on the known classes of `val`; rejection of held-out images at the threshold
    that answers `coverage` of the known-class test images."""
    held_t = torch.tensor(held)
    keep = ~torch.isin(bank.y, held_t)
    model = knn.TorchKnn(bank.z[keep], bank.y[keep], num_classes, k)
    known_val = ~torch.isin(val.y, held_t)
    _, val_counts = model.predict(val.z[known_val])
    calibration = conformal.calibration_scores(val_counts, val.y[known_val], k)
    pred, counts = model.predict(test.z)
    cred = conformal.trust(counts, pred, calibration, k).credibility
    share = counts.gather(1, pred[:, None]).squeeze(1).float() / k
    known = ~torch.isin(test.y, held_t)
    threshold = conformal.threshold_for_coverage(cred[known], coverage)
    return {"n_known": int(known.sum()), "n_held_out": int((~known).sum()),
            "known_accuracy": float((pred[known] == test.y[known]).float().mean()),
            "auroc_credibility": conformal.auroc(cred[known], cred[~known]),
            "auroc_vote_share": conformal.auroc(share[known], share[~known]),
            "threshold": threshold,
            "known_answered": float((cred[known] >= threshold).float().mean()),
            "held_out_rejected": float((cred[~known] < threshold).float().mean()),
            "mean_credibility_known": float(cred[known].mean()),
            "mean_credibility_held_out": float(cred[~known].mean())}


def evaluate(path: str, data: str, held_names: tuple[str, ...], n_test: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    art = load_artifact(path)
    missing = [c for c in held_names if c not in art.classes]
    if missing:
        raise SystemExit(f"{path}: no class {missing} (its classes: {art.classes})")
    xv, yv = validation_split(art, data)
    test = load_dataset(data, "test")
    xt, yt = test.images[:n_test], np.asarray(test.labels)[:n_test]
    row = open_set(Embedded(art.bank.float(), art.bank_labels.long()),
                   Embedded(knn.embed(art.encoder, xv, batch_size=500), torch.as_tensor(yv).long()),
                   Embedded(knn.embed(art.encoder, xt, batch_size=500), torch.as_tensor(yt).long()),
                   [art.classes.index(c) for c in held_names], art.num_classes, art.k)
    return {"model": Path(path).name, "method": art.manifest.get("training", {}).get("method", "?"),
            **row, "seconds": round(time.perf_counter() - t0, 1)}


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Open-set check of conformal credibility (`benchmarks/open_set.py`, issue 14)", "",
        f"Run {r['date']}; {r['machine']}; load average at start {r['load_average']}.", "",
        f"Bank without **{', '.join(r['held_out'])}** (their rows removed); calibration recomputed on each "
        f"artifact's validation split, known classes only; first {r['n_test']} test images. AUROC: known-class "
        "test images (positive) against held-out-class ones, higher = held-out classes look less credible. "
        f"Rejected: held-out images below the credibility threshold that answers {pct(r['coverage'])} of the "
        "known-class test images.", "",
        "| model | method | known-class accuracy | AUROC credibility | AUROC vote share | threshold | known answered "
        "| **held-out rejected** | mean credibility known / held-out |",
        "|---|---|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        lines.append(
            f"| {m['model']} | {m['method']} | {pct(m['known_accuracy'])} | {m['auroc_credibility']:.3f} "
            f"| {m['auroc_vote_share']:.3f} | {m['threshold']:.3f} | {pct(m['known_answered'])} "
            f"| **{pct(m['held_out_rejected'])}** | {m['mean_credibility_known']:.3f} / "
            f"{m['mean_credibility_held_out']:.3f} |")
    lines += ["", "Credibility is the p-value of the predicted class, a monotone function of that class's vote count "
              "(nonconformity = k - votes), so it ranks images exactly as the winning vote share does: the two AUROC "
              "columns agree by construction. What calibration adds is the threshold's meaning (a p-value with a "
              "stated coverage), not ranking power.", "",
              "The encoders saw the held-out classes' training images unlabelled (self-supervised) or labelled "
              "(supervised): only the bank lacks them, so this is the open-set case the service meets when a "
              "class is missing from its bank, not a test on classes no model ever saw.", "",
              f"Command: `{r['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="*", default=["artifacts/default"])
    p.add_argument("--data", default="data")
    p.add_argument("--held-out", nargs="+", default=list(HELD_OUT), help="classes removed from the bank")
    p.add_argument("--n-test", type=int, default=None, help="first N test images (None: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/open_set")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    models = [evaluate(path, a.data, tuple(a.held_out), a.n_test) for path in a.artifacts]
    n_test = models[0]["n_known"] + models[0]["n_held_out"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": load,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads",
              "held_out": list(a.held_out), "coverage": COVERAGE, "n_test": n_test, "models": models,
              "command": "python benchmarks/open_set.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_result(Path(a.out), result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
