"""The suite's result as markdown, plots and artifact cards."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training.artifact import CARD, update_artifact
from training.card import fmt_eps, suite_section, with_suite_section
from training.card import pct as _pct
from training.card import verdict as _verdict
from training.manifest import KnnSurrogate, Manifest, Metrics, RobustResult

COVERAGE_POINTS = (1.0, 0.9, 0.8, 0.5)  # the coverages the markdown table reports
HEADLINE_ONLY = ("Headline only (`--headline-only`, a gate): clean accuracy, the surrogate sweep and the main-table "
                 "attacks with their worst case at the main eps; no eps sweep, paper table, masking checks or "
                 "torchattacks cross-check were run.")


def finite(x: float) -> float | None:
    """JSON has no NaN: undefined numbers (no image to measure on) are null."""
    return None if isinstance(x, float) and math.isnan(x) else x


def markdown_report(result: dict[str, Any]) -> str:
    """The human-readable report: worst case first, then each attack, eps sweep, paper table, checks."""
    models, cfg = result["models"], result["config"]
    eps = fmt_eps(cfg["eps"])
    n_att = models[0]["worst_case"]["n"] if models else 0
    names = [r["attack"] for r in models[0]["attacks"]] if models else []
    for m in models[1:]:
        names += [r["attack"] for r in m["attacks"] if r["attack"] not in names]
    validation = result["protocol"].get("split") == "validation"
    lines = [f"# Robustness report{' (quick mode: not the full protocol)' if result['quick'] else ''}"
             f"{' on the validation split: for choices, not for claims' if validation else ''}", "",
             *([HEADLINE_ONLY, ""] if cfg.get("headline_only") else []),
             _provenance(result) +
             f"Threat model: {result['protocol']['threat_model']}. "
             f"Scoring: {result['protocol']['scoring']}.", "",
             f"## Worst case at eps {eps} (an image is robust only if it survives every attack)", "",
             f"| model | method | clean (n) | clean, exact images (n) | **worst case** (n={n_att}) | surrogate T |",
             "|---|---|---|---|---|---|"]
    for m in models:
        c = m["clean"]
        lines.append(f"| {m['name']} | {m['method']} | {_pct(c['acc'])} % ({c['n']}) | {_pct(c['exact_acc'])} % "
                     f"({c['exact_n']}) | **{_pct(m['worst_case']['acc'])} %** | {m['temperature']['surrogate']} |")
    lines += ["", f"## Accuracy (%) under each attack at eps {eps}", "",
              "| model | clean (attacked images) | " + " | ".join(names) + " | worst case | noise |",
              "|---|---|" + "---|" * len(names) + "---|---|"]
    for m in models:
        acc = {r["attack"]: r["acc"] for r in m["attacks"]}
        lines.append(f"| {m['name']} | {_pct(m['attacked']['acc'])} | " + " | ".join(_pct(acc.get(a)) for a in names)
                     + f" | **{_pct(m['worst_case']['acc'])}** | {_pct(m['noise']['acc'])} |")
    lines += ["", "Attack protocols:", ""]
    seen = set()
    for m in models:
        for r in m["attacks"]:
            if r["attack"] not in seen:
                seen.add(r["attack"])
                lines.append(f"- `{r['attack']}`: {r['protocol']}")
    sweep_eps = [r["eps"] for r in models[0]["eps_sweep"]] if models else []
    lines += ["", "## Accuracy (%) vs eps: adaptive worst case / paper's guided attack", "",
              "| model | " + " | ".join(fmt_eps(e) for e in sweep_eps) + " |", "|---|" + "---|" * len(sweep_eps)]
    for m in models:
        lines.append(f"| {m['name']} | " + " | ".join(f"{_pct(r['worst_case_acc'])} / {_pct(r['guided_acc'])}"
                                                   for r in m["eps_sweep"]) + " |")
    if models:
        lines += ["", f"Worst case here: {models[0]['eps_sweep'][-1]['protocol'].split('; guided')[0]}. "
                  "Plot: `robustness_eps.png`."]
    if not cfg.get("headline_only"):
        lines += paper_section(models)
    lines += abstention_section(models, eps)
    if not cfg.get("headline_only"):
        lines += masking_section(models)
    lines += ["", "## Surrogate choice (on held-out training images): hard-vote accuracy (%) after PGD", ""]
    if models:
        cols = [(r["temperature"], r["k"]) for r in models[0]["temperature"]["sweep"]]
        lines += ["| model | " + " | ".join(f"T={t:g}" + ("" if k is None else f", k={k}") for t, k in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for m in models:
            cells = [_pct(r["acc"]) + " (0 grad)" * (r["zero_gradient_share"] > 0.01)
                     for r in m["temperature"]["sweep"]]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
        lines += ["", models[0]["temperature"]["protocol"] + ". (0 grad): over 1 % of the images have an all-zero "
                  "input gradient on that surrogate (saturated softmax)."]
    v = result.get("torchattacks_validation")
    lines += ["", "## Cross-check against torchattacks", ""]
    if not v:
        lines.append("Not run.")
    elif "skipped" in v:
        lines.append(f"Skipped: {v['skipped']}.")
    else:
        lines += [f"torchattacks {v['torchattacks_version']} on {v['model']}, {v['n']} images, "
                  f"eps {fmt_eps(v['eps'])}, "
                  f"PGD {v['pgd_steps']} steps, APGD {v['apgd_steps']} steps; {v['protocol']}. Clean "
                  f"{_pct(v['clean'])} %.", "", "| attack | ours | torchattacks | difference (points) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['attack']} | {_pct(r['ours'])} | {_pct(r['torchattacks'])} | {r['diff_points']:+.1f} |"
                  for r in v["rows"]]
    lines += ["", "## Models", ""]
    lines += [f"- {m['name']}: `{m['path']}`, model sha256 `{m['model_sha256'][:16]}...` (encoder, bank and vote), "
              f"{m['encoder'].get('arch', '?')} width {m['encoder'].get('width', '?')}, k={m['knn'].get('k', '?')}; "
              f"evaluated in {m['seconds'] / 60:.1f} min"
              + (f" (run: `{m['run']['file']}`, code {m['run']['code_version']}, {m['run']['created']})"
                 if "run" in m else "") for m in models]
    return "\n".join(lines) + "\n"


def paper_section(models: list[dict[str, Any]]) -> list[str]:
    """The paper's defence success rate beside our adaptive worst case."""
    lines = ["", "## The paper's protocol: defence success rate", "",
             "Share of the attacked, originally correct images whose k-NN prediction is unchanged (Chen et al. 2020, "
             "100 test images there); ours under the paper's guided attack and under our adaptive worst case.", "",
             "| model | method | eps | attacked | paper's guided attack | adaptive worst case | paper reports |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        for r in m["paper_protocol"]:
            lines.append(f"| {m['name']} | {m['method']} | {r['eps']:g} | {r['n_attacked']} | "
                         f"{r['defence_success_rate']:.2f} | {r['adaptive_defence_rate']:.2f} | "
                         f"{r['paper_reported'] or '-'} |")
    return lines


def abstention_section(models: list[dict[str, Any]], eps: str) -> list[str]:
    """Abstention at the main eps and clean accuracy against coverage (models calibrated on a test run)."""
    with_abst = [m for m in models if m.get("abstention")]
    if not with_abst:
        return []
    lines = ["", f"## Abstention (conformal credibility) at eps {eps}", "",
             "| model | threshold | clean coverage | selective clean acc | attack | robust acc, no abstention | "
             "**robust acc with abstention** | adversarial abstained on | AUROC clean vs adv |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in with_abst:
        a = m["abstention"]
        for r in a["attacks"]:
            abst = "-" if r["abstained_on_adversarial"] is None else _pct(r["abstained_on_adversarial"])
            lines.append(f"| {m['name']} | {a['threshold']:.3f} | {_pct(a['coverage'])} % | "
                         f"{_pct(a['selective_clean_acc'])} % | {r['attack']} | "
                         f"{_pct(r['robust_acc_without_abstention'])} % | "
                         f"**{_pct(r['robust_acc_with_abstention'])} %** | {abst} % | "
                         + ("-" if r["auroc_clean_vs_adversarial"] is None else
                            f"{r['auroc_clean_vs_adversarial']:.3f}") + " |")
    lines += ["", with_abst[0]["abstention"]["protocol"] + ".", "",
              "Clean accuracy against coverage (answering only images whose credibility reaches each threshold; "
              "`robustness_coverage.png`):", "",
              "| model | " + " | ".join(f"coverage >= {c:.0%}" for c in COVERAGE_POINTS) + " |",
              "|---|" + "---|" * len(COVERAGE_POINTS)]
    for m in with_abst:
        cells = []
        for c in COVERAGE_POINTS:
            ok = [r for r in m["abstention"]["coverage_curve"] if r["coverage"] >= c and r["accuracy"] is not None]
            best = max(ok, key=lambda r: r["accuracy"], default=None)
            cells.append("-" if best is None else f"{_pct(best['accuracy'])} % ({_pct(best['coverage'])} %)")
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return lines


def masking_section(models: list[dict[str, Any]]) -> list[str]:
    """The gradient-masking checks, one row per model and check."""
    lines = ["", "## Gradient-masking checks", "", "| model | check | result | detail |", "|---|---|---|---|"]
    for m in models:
        for c in m["masking_checks"]:
            lines.append(f"| {m['name']} | {c['check']} | {_verdict(c['passed'])} | {c['detail']} |")
    return lines


def _provenance(result: dict[str, Any]) -> str:
    """Which code measured it, when, on what: one run, or each run of a merged report (`merge.merge_results`)."""
    if "merged_from" not in result:
        return (f"Code {result['code_version']}, seed {result['seed']}, {result['device']}, torch {result['torch']}, "
                f"{result['created']}, {result['seconds'] / 60:.1f} min. ")
    runs = "; ".join(f"{', '.join(r['models'])} from `{r['file']}` (code {r['code_version']}, {r['created']}, "
                     f"torch {r['torch']})" for r in result["merged_from"])
    return (f"Merged from {len(result['merged_from'])} suite runs of one protocol (seed {result['seed']}, "
            f"{result['device']}): {runs}. ")


def _save_plot(fig: Any, ax: Any, path: Path) -> Path:
    """Common finish of the report plots: grid, legend, tight layout, PNG, figure closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_eps(result: dict[str, Any], path: Path) -> Path:
    """Accuracy vs eps for all models on one figure: worst case solid, paper's guided attack dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, m in enumerate(result["models"]):
        rows = sorted(m["eps_sweep"], key=lambda r: r["eps"])
        e = [r["eps"] * 255 for r in rows]
        color = f"C{i}"
        ax.plot(e, [100 * r["worst_case_acc"] for r in rows], "o-", color=color, label=f"{m['name']}: worst case")
        ax.plot(e, [100 * r["guided_acc"] for r in rows], "s--", color=color, alpha=0.6,
                label=f"{m['name']}: paper's guided attack")
    ax.axvline(result["config"]["eps"] * 255, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("L-inf eps (/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("k-NN accuracy vs attack radius" + (" (quick mode)" if result["quick"] else ""))
    return _save_plot(fig, ax, path)


def plot_temperature(result: dict[str, Any], path: Path) -> Path:
    """Hard-vote accuracy after PGD on the surrogate vs its temperature, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    for i, m in enumerate(result["models"]):
        for k, style in ((None, "o-"), ("topk", "s--")):
            rows = [r for r in m["temperature"]["sweep"] if (r["k"] is None) == (k is None)]
            if rows:
                ax.semilogx([r["temperature"] for r in rows], [100 * r["acc"] for r in rows], style, color=f"C{i}",
                            label=f"{m['name']}, " + ("whole bank" if k is None else f"{rows[0]['k']} nearest")
                            + f" (chosen: {m['temperature']['surrogate']})" * (k is None))
    ax.set_xlabel("soft-kNN temperature")
    ax.set_ylabel("accuracy after PGD (%)")
    ax.set_title("Surrogate temperature sweep (held-out images)")
    return _save_plot(fig, ax, path)


def plot_coverage(result: dict[str, Any], path: Path) -> Path | None:
    """Clean accuracy vs coverage under the credibility threshold, per model with calibration (None: no model has)."""
    models = [m for m in result["models"] if m.get("abstention")]
    if not models:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    for i, m in enumerate(result["models"]):
        if not m.get("abstention"):
            continue
        rows = sorted((r for r in m["abstention"]["coverage_curve"] if r["accuracy"] is not None),
                      key=lambda r: r["coverage"])
        ax.plot([100 * r["coverage"] for r in rows], [100 * r["accuracy"] for r in rows], "o-", color=f"C{i}",
                label=m["name"])
    ax.set_xlabel("coverage: clean test images answered (%)")
    ax.set_ylabel("accuracy on the answered (%)")
    ax.set_title("Abstention by conformal credibility")
    return _save_plot(fig, ax, path)


def write_reports(result: dict[str, Any], out: str | Path, stem: str = "robustness") -> dict[str, str]:
    """`<stem>.json`, `<stem>.md`, `<stem>_eps.png`, `<stem>_temperature.png` (and `<stem>_coverage.png` when a
    model has calibration scores) in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "eps_plot": out / f"{stem}_eps.png",
             "temperature_plot": out / f"{stem}_temperature.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["markdown"].write_text(markdown_report(result))
    plot_eps(result, paths["eps_plot"])
    plot_temperature(result, paths["temperature_plot"])
    coverage = plot_coverage(result, out / f"{stem}_coverage.png")
    if coverage is not None:
        paths["coverage_plot"] = coverage
    return {k: str(v) for k, v in paths.items()}


def update_card(artifact: str | Path, model: dict[str, Any], result: dict[str, Any], plot: str | Path | None) -> None:
    """Write the suite's section into card.md (replacing an earlier one), copy the plot, record the results in
    `metrics.robust` and the chosen surrogate in `knn.surrogate`; `update_artifact` re-hashes, so the artifact
    still verifies."""
    path = Path(artifact)
    card = (path / CARD).read_text() if (path / CARD).is_file() else f"# Model card: {model['name']}\n"
    files = {CARD: with_suite_section(card, suite_section(model, result)).encode()}
    if plot is not None:
        files["robustness_eps.png"] = Path(plot).read_bytes()

    def record(manifest: Manifest) -> None:
        if manifest.model_sha256 != model["model_sha256"]:
            raise ValueError(f"{path}: encoder, bank or vote differ from the evaluated {model['model_sha256'][:12]}")
        metrics = manifest.metrics = manifest.metrics or Metrics()
        robust = [r for r in metrics.robust or [] if r.suite != "robustness"]
        most = max((r["steps"] for r in model["attacks"]), default=0)  # the worst case's longest attack
        for r in model["attacks"] + [{"attack": "worst_case", "steps": most, **model["worst_case"]}]:
            robust.append(RobustResult(attack=r["attack"], norm="linf", eps=r["eps"], steps=r.get("steps"),
                                       acc=r["acc"], n=r["n"], suite="robustness", code_version=result["code_version"],
                                       quick=result["quick"]))
        metrics.robust = robust
        sur = model["temperature"]  # what /attack differentiates: the suite's strongest
        manifest.knn.surrogate = KnnSurrogate(temperature=sur["selected"], k=sur["selected_k"],
                                              chosen_by="robustness suite temperature sweep")

    update_artifact(path, record, files)
