"""Robustness benchmark (DESIGN section 6, issue 5): the full evaluation protocol on the shipped artifacts.

Evaluates artifacts/default (SAT), artifacts/supervised and artifacts/ssl when present (or the artifacts given) with
`training.robustness`: clean accuracy on all 10,000 test images and on the exact first 1,017; on the
first 1,000 test images PGD-20/50, APGD-CE, APGD-DLR (soft-kNN surrogate, temperature chosen on held-out
training images), the paper's guided attack, an embedding attack and transfer from the supervised model,
the per-image worst case; the eps sweep (0, 2, 4, 8, 12, 16 /255, 0.03, 0.06); the paper's protocol table;
gradient-masking checks; a torchattacks cross-check when it is installed. Writes
benchmarks/results/robustness.{json,md} + robustness_eps.png + robustness_temperature.png, and with
--update-cards the result table into each artifact's card.md (re-hashed in manifest.json).

Per-attack results are cached in runs/robustness_cache/, so an interrupted run resumes where it stopped
(rerun the same command). On 2 CPU cores a full run takes roughly 1-2 hours per ResNet-10-w16 model.

    python benchmarks/robustness.py                      # artifacts/default, supervised (+ ssl if present)
    python benchmarks/robustness.py --update-cards       # ... and update their model cards
    python benchmarks/robustness.py --artifacts artifacts/default artifacts/supervised artifacts/ssl
    python benchmarks/robustness.py --quick              # smoke run (minutes) -> test-output/robustness_quick/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from training.robustness import SuiteConfig, parse_eps, run_suite  # noqa: E402

DEFAULT_ARTIFACTS = ("artifacts/default", "artifacts/supervised")
OPTIONAL_ARTIFACTS = ("artifacts/ssl",)  # the SSL+kNN row of the paper's table, evaluated when it exists


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", nargs="+", default=None,
                   help="artifact folders (default: artifacts/default artifacts/supervised, and artifacts/ssl if "
                        "present)")
    p.add_argument("--transfer-source", default=None,
                   help="artifact whose adversarial images are transferred (default: the supervised one; 'none')")
    p.add_argument("--data", default="data", help="CIFAR-10 in the official python layout (`make data`)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results, quick: "
                                               "test-output/robustness_quick)")
    p.add_argument("--cache-dir", default="runs/robustness_cache", help="per-attack cache (resume)")
    p.add_argument("--quick", action="store_true", help="a few dozen images, few steps")
    p.add_argument("--n-robust", type=int, default=None, help="first N test images attacked (default 1000)")
    p.add_argument("--eps", type=parse_eps, default=None, help="main radius, e.g. 8/255 (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-resume", action="store_true", help="ignore cached per-attack results")
    p.add_argument("--update-cards", action="store_true",
                   help="write the results into each artifact's card.md and re-hash it in manifest.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.artifacts is None:
        args.artifacts = [*DEFAULT_ARTIFACTS, *(a for a in OPTIONAL_ARTIFACTS if (Path(a) / "manifest.json").is_file())]
    missing = [a for a in args.artifacts if not (Path(a) / "manifest.json").is_file()]
    if missing:
        print(f"no artifact at {missing}: train and export them first (scripts/train_cpu_default.sh)",
              file=sys.stderr)
        return 2
    out = args.out or ("test-output/robustness_quick" if args.quick else "benchmarks/results")
    common = dict(data=args.data, out=out, cache_dir=args.cache_dir, seed=args.seed, device=args.device,
                  resume=not args.no_resume)
    cfg = SuiteConfig.quick_config(**common) if args.quick else SuiteConfig(**common)
    overrides = {k: v for k, v in {"n_robust": args.n_robust, "eps": args.eps}.items() if v is not None}
    if overrides:
        from dataclasses import replace

        cfg = replace(cfg, **overrides)
    summary = run_suite(cfg, args.artifacts, args.transfer_source, update_cards=args.update_cards)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
