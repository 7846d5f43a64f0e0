"""Model cards (card.md, DESIGN section 3): every piece of card markdown is rendered here.

`render_card` writes the card `write_artifact` ships from the manifest (data, method, measured metrics,
provenance); the robustness suite adds its own section between markers (`suite_section`), replaced on
every run by `with_suite_section`, so a card keeps exactly one, after the exported text.
"""

from __future__ import annotations

import json
from typing import Any

from training.manifest import EncoderSpec, Manifest

CARD_BEGIN, CARD_END = "<!-- robustness-suite:begin -->", "<!-- robustness-suite:end -->"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def verdict(passed: bool | None) -> str:
    return "info" if passed is None else "pass" if passed else "**FAIL**"


def fmt_eps(eps: float) -> str:
    """8/255-style when eps is a whole number of 255ths, else the decimal."""
    q = eps * 255
    return f"{round(q)}/255" if abs(q - round(q)) < 1e-6 else f"{eps:g}"


def _embedding(enc: EncoderSpec) -> str:
    mirror = " averaged over the image and its mirror image" if enc.mirror_average else ""
    if enc.reduce_dim is None:
        return f"{enc.embed_dim}-d L2-normalised embedding{mirror}"
    kept = enc.extra.get("reduce_explained_variance")
    share = f", {100 * kept:.1f} % of the bank's variance" if isinstance(kept, (int, float)) else ""
    return (f"{8 * enc.width}-d L2-normalised features{mirror} reduced to a {enc.reduce_dim}-d embedding by a PCA of "
            f"the bank baked into the encoder{share}")


def _adversarial_rows(manifest: Manifest) -> str:
    a = manifest.bank_adversarial
    if a is None:
        return "."
    return (f", plus {a.rows} adversarial rows: the embeddings of the bank images whose vote {a.attack} "
            f"({a.steps} steps, eps {a.eps * 255:.0f}/255, soft-kNN surrogate T = {a.temperature:g}) flipped, "
            f"labelled with their own labels ({a.rows} of {a.attacked} attacked"
            + (f", the first {a.max_rows} flipped in bank order" if a.max_rows is not None else "")
            + "; `satml harden-bank`).")


def render_card(manifest: Manifest) -> str:
    """Markdown model card from the manifest: data, method, measured metrics, provenance."""
    t, m, enc, knn = manifest.training, manifest.metrics, manifest.encoder, manifest.knn
    if t is None:
        raise ValueError("a model card needs the manifest's training section")
    lines = [
        f"# Model card: {manifest.name}", "", manifest.description, "",
        "## Model",
        f"- Encoder: {enc.arch} width {enc.width} (CIFAR stem), {_embedding(enc)}; "
        "inputs RGB in [0, 1], normalisation inside the model.",
        f"- Classifier: k-NN, k = {knn.k}, {knn.metric} distance, "
        f"unweighted majority vote over a bank of {manifest.bank_size} training embeddings"
        + (" and those of their mirror images" if (manifest.bank_views or 1) == 2 else "")
        + _adversarial_rows(manifest),
        f"- Dataset: {manifest.dataset} ({len(manifest.classes)} classes: {', '.join(manifest.classes)}).",
        "", "## Training",
        f"- Method: `{t.method}`; epochs {t.epochs}; seed {t.seed}; code {t.code_version}.",
        f"- Wall time: {(t.train_seconds or 0) / 60:.1f} min on {t.device or 'unknown'}.",
        f"- Hyper-parameters: `{json.dumps(t.hyperparameters)}`",
        "", "## Measured accuracy", "",
        "| evaluation | images | accuracy |", "|---|---|---|",
    ]
    split = (m.extra.get("eval_split") if m is not None else None) or "test"  # validation: data without a test set
    if m is not None and m.clean_acc is not None:
        lines.append(f"| clean k-NN | {m.clean_n if m.clean_n is not None else '?'} {split} | "
                     f"{100 * m.clean_acc:.2f} % |")
    for r in (m.robust if m is not None else None) or []:
        lines.append(f"| {r.attack} {r.norm} eps {r.eps * 255:.0f}/255, {r.steps} steps | {r.n} {split} | "
                     f"{100 * r.acc:.2f} % |")
    lines += ["", "Robust accuracy is the hard k-NN vote on adversarial images crafted on the differentiable "
              "soft-kNN surrogate (PGD with random start). It is an upper bound on true robustness: see the "
              "evaluation suite in `benchmarks/` for stronger adaptive attacks.", ""]
    return "\n".join(lines)


def with_suite_section(card: str, section: str) -> str:
    """`card` with its robustness-suite section (if any) replaced by `section`, which goes last."""
    if CARD_BEGIN in card and CARD_END in card:
        head, rest = card.split(CARD_BEGIN, 1)
        card = head + rest.split(CARD_END, 1)[1].lstrip("\n")
    return card.rstrip("\n") + "\n\n" + section


def suite_section(model: dict[str, Any], result: dict[str, Any]) -> str:
    """Markdown block for one model's card (between markers, replaced on every update)."""
    eps = fmt_eps(result["config"]["eps"])
    lines = [CARD_BEGIN, "## Robustness (evaluation suite)", "",
             f"Suite run {result['created']}, code {result['code_version']}, seed {result['seed']}"
             + (", **quick mode (not the full protocol)**" if result["quick"] else "") + ". Hard k-NN vote on "
             f"adversarial images; attacks crafted on the soft-kNN surrogate "
             f"({model['temperature']['surrogate']}, chosen on held-out training images).", "",
             "| evaluation | images | accuracy |", "|---|---|---|",
             f"| clean | {model['clean']['n']} test | {pct(model['clean']['acc'])} % |",
             f"| clean, exact test images | {model['clean']['exact_n']} | {pct(model['clean']['exact_acc'])} % |",
             f"| **worst case, eps {eps}** | {model['worst_case']['n']} test | "
             f"**{pct(model['worst_case']['acc'])} %** |"]
    for r in model["attacks"]:
        lines.append(f"| {r['attack']}, eps {eps}, {r['steps']} steps | {r['n']} test | {pct(r['acc'])} % |")
    lines.append(f"| random noise, eps {eps} | {model['noise']['n']} test | {pct(model['noise']['acc'])} % |")
    lines += ["", "Accuracy (%) vs eps, adaptive worst case / the paper's guided attack:", "",
              "| " + " | ".join(fmt_eps(r["eps"]) for r in model["eps_sweep"]) + " |",
              "|" + "---|" * len(model["eps_sweep"]),
              "| " + " | ".join(f"{pct(r['worst_case_acc'])} / {pct(r['guided_acc'])}" for r in model["eps_sweep"])
              + " |", "",
              "Paper protocol (defence success rate, guided attack / adaptive): "
              + "; ".join(f"eps {r['eps']:g}: {r['defence_success_rate']:.2f} / {r['adaptive_defence_rate']:.2f}"
                          for r in model["paper_protocol"]) + ".", "",
              "Gradient-masking checks: " + ", ".join(f"{c['check']}: {verdict(c['passed'])}"
                                                      for c in model["masking_checks"] if c["passed"] is not None)
              + ".", "",
              "![accuracy vs eps](robustness_eps.png)", ""]
    if a := model.get("abstention"):
        lines += [f"Abstention (conformal credibility, threshold {a['threshold']:.3f} answering "
                  f"{pct(a['coverage'])} % of the clean images, selective clean accuracy "
                  f"{pct(a['selective_clean_acc'])} %), robust accuracy with abstention at eps {eps}: "
                  + "; ".join(f"{r['attack']}: {pct(r['robust_acc_with_abstention'])} % (without abstention "
                              f"{pct(r['robust_acc_without_abstention'])} %)" for r in a["attacks"])
                  + ". Claim only the adaptive figure.", ""]
    lines += [CARD_END, ""]
    return "\n".join(lines)
