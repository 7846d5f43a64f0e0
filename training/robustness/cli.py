"""`satml robustness`: arguments -> `SuiteConfig` -> `run_suite`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from training.robustness.config import SPLITS, SuiteConfig
from training.robustness.suite import run_suite
from training.robustness.verdict import parse_rule


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", help="artifact folders, e.g. artifacts/default artifacts/supervised")
    p.add_argument("--transfer-source", default=None,
                   help="artifact whose adversarial images are transferred (default: the supervised one; 'none')")
    p.add_argument("--data", default="data", help="dataset path (CIFAR-10 python layout)")
    p.add_argument("--out", default=None, help="folder for robustness.{json,md} and the plots (default: "
                   "benchmarks/results; with --quick: test-output/robustness_quick, so quick runs never overwrite)")
    p.add_argument("--cache-dir", default=None, help="per-attack results for resuming (default: <out>/cache)")
    p.add_argument("--quick", action="store_true", help="a few dozen images and few steps (tests, CI)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test: the report and the cards; validation: the artifacts' held-out training images, for "
                        "choosing a k, a vote or a recipe without the test set (no cards, no abstention stage)")
    p.add_argument("--headline-only", action="store_true",
                   help="a gate for choices: clean, the main-table attacks and their worst case only (no eps sweep, "
                        "paper table, masking checks or torchattacks cross-check; no cards)")
    p.add_argument("--n-robust", type=int, default=None, help="first N test images attacked (full: 1000)")
    p.add_argument("--n-clean", type=int, default=None, help="test images for clean accuracy (full: all)")
    p.add_argument("--eps", type=parse_eps, default=None, help="main L-inf radius in [0, 1], e.g. 8/255 (full: 8/255)")
    p.add_argument("--eps-sweep", type=parse_eps, nargs="+", default=None,
                   help="radii of the accuracy-vs-eps sweep (full: 0 2/255 4/255 8/255 12/255 16/255 0.03 0.06)")
    p.add_argument("--validate-n", type=int, default=None, help="images for the torchattacks cross-check (0: skip)")
    p.add_argument("--batch-size", type=int, default=None, help="images per attack batch")
    p.add_argument("--seed", type=int, default=0, help="seed of every random start")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse per-attack results from the cache folder")
    p.add_argument("--update-cards", action="store_true",
                   help="write the results into each artifact's card.md and re-hash it in manifest.json")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.add_argument("--stop-below", type=parse_rule, default=None, metavar="FIGURE=MIN[,...]",
                   help="a gate of one candidate that fails fast: stop at the first of clean / exact / worst (the "
                        "running per-image worst case) under its minimum, write <out>/stopped.json instead of the "
                        "report and exit 3 (the rule syntax of robustness-verdict, which reads the record as a fail)")


def parse_eps(text: str) -> float:
    """'8/255' or '0.03' -> float in [0, 1] pixel units."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}") from e
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"eps must be in [0, 1] pixel units, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    sweep = tuple(args.eps_sweep) if args.eps_sweep else None
    over = {k: v for k, v in {"n_robust": args.n_robust, "n_clean": args.n_clean, "eps": args.eps, "eps_sweep": sweep,
                                "validate_n": args.validate_n, "batch_size": args.batch_size}.items() if v is not None}
    out = args.out or ("test-output/robustness_quick" if args.quick else "benchmarks/results")
    if args.split != "test" and not args.out:
        out = f"{out}/validation"  # never over the test-set report
    common = dict(data=args.data, out=out, cache_dir=args.cache_dir, seed=args.seed, device=args.device,
                  resume=args.resume, progress=args.progress, split=args.split,
                  headline_only=args.headline_only, stop_below=args.stop_below)
    cfg = SuiteConfig.quick_config(**common) if args.quick else SuiteConfig(**common)
    return replace(cfg, **over)


def cmd_robustness(args: argparse.Namespace) -> dict[str, Any]:
    return run_suite(config_from_args(args), args.artifacts, args.transfer_source, args.update_cards)


def add_cli(sub: Any) -> None:
    """Register `satml robustness`."""
    p = sub.add_parser("robustness", help="robustness evaluation suite: adaptive attacks, eps sweep, paper protocol, "
                       "masking checks; JSON + markdown + plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_robustness)
    r = sub.add_parser("robustness-report", help="one report (JSON + markdown + plots) from several suite runs of "
                       "the same protocol, e.g. the shipped models evaluated at different times",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("sources", nargs="+", metavar="FILE[:name,...]",
                   help="a suite's robustness.json, optionally with the models to take from it, in order")
    r.add_argument("--out", required=True, help="folder for <stem>.json, <stem>.md and the plots")
    r.add_argument("--stem", default="robustness", help="file name stem")
    r.add_argument("--artifacts", default=None,
                   help="refuse a row whose model differs from <artifacts>/<name> (verified): the report then "
                        "describes the files shipped there")
    r.set_defaults(func=cmd_report)
    c = sub.add_parser("robustness-card", help="write a finished suite report's results into an artifact's card "
                       "(the row of the same model, by sha256), as --update-cards would have",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("artifact", help="artifact folder, e.g. artifacts/default")
    c.add_argument("report", help="a suite's robustness.json (its <stem>_eps.png beside it is copied too)")
    c.set_defaults(func=cmd_card)


def cmd_card(args: argparse.Namespace) -> dict[str, Any]:
    """A finished suite report's row for ARTIFACT (matched by model sha256) into its card, as --update-cards would
    have written it: shipping a candidate that was evaluated in another folder, without attacking it again."""
    import json
    from pathlib import Path

    from training.artifact import verify_artifact
    from training.robustness.merge import protocol_of
    from training.robustness.report import update_card
    from training.robustness.suite import check_card_worthy

    report = Path(args.report)
    result = json.loads(report.read_text())
    protocol = protocol_of(result)  # a run from before the split / headline_only fields read as the merge reads it
    check_card_worthy(protocol["split"], protocol["headline_only"])
    sha = verify_artifact(args.artifact).model_sha256
    models = result.get("models") or []
    model = next((m for m in models if m.get("model_sha256") == sha), None)
    if model is None:
        raise ValueError(f"{report}: no row for the model in {args.artifact} (sha256 {sha[:12]}); rows: "
                         f"{', '.join(str(m.get('name')) + ' ' + str(m.get('model_sha256'))[:12] for m in models)}")
    found = report.with_name(f"{report.stem}_eps.png")
    plot = found if found.is_file() else None
    update_card(args.artifact, model, result, plot)
    return {"artifact": args.artifact, "model": model["name"], "worst_case": model["worst_case"]["acc"],
            "plot": plot and str(plot)}


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from training.robustness.merge import check_artifacts, load_sources, merge_results
    from training.robustness.report import write_reports

    result = merge_results(load_sources(args.sources))
    if args.artifacts is not None:
        check_artifacts(result, args.artifacts)
    return {"models": [m["name"] for m in result["models"]], "paths": write_reports(result, args.out, args.stem)}
