"""One report from several suite runs of the same protocol (`satml robustness-report`).

The shipped models were evaluated at different times (a model is re-run only when it changes), so the current
table for all of them lives in several `robustness.json` files. Merging refuses runs whose protocols differ
(eps, image counts, attack steps, seed, surrogates, transfer source), so a merged table compares like with like,
and it can check that each row still describes the files an artifact folder holds (`model_sha256`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.artifact import verify_artifact

# config keys that say where or how fast a run went, not what it measured
NOT_PROTOCOL = frozenset({"out", "cache_dir", "progress", "resume", "device", "batch_size", "data"})


def protocol_of(result: dict[str, Any]) -> dict[str, Any]:
    """What a run measured: its config without paths and speed knobs (a missing split is the test split and a
    missing headline_only the full protocol, the defaults before the fields existed), its quick flag and its
    transfer source."""
    cfg = {k: v for k, v in result["config"].items() if k not in NOT_PROTOCOL}
    cfg["split"] = cfg.get("split") or "test"
    cfg["headline_only"] = bool(cfg.get("headline_only"))  # absent before the field existed: the full protocol
    source = result.get("transfer_source")
    return cfg | {"quick": result["quick"], "transfer_source": source and source["model_sha256"]}


def parse_source(text: str) -> tuple[Path, list[str] | None]:
    """`FILE` (every model in it) or `FILE:name,name` (those models, in that order)."""
    path, sep, names = text.partition(":")
    if not sep:
        return Path(path), None
    picked = [n for n in names.split(",") if n]
    if not picked:
        raise ValueError(f"{text!r}: no model names after ':'")
    return Path(path), picked


def merge_results(sources: Sequence[tuple[str, dict[str, Any], list[str] | None]]) -> dict[str, Any]:
    """(label, result, names or None for all) per run -> one result whose models come from the runs in order.
    Raises ValueError when the runs' protocols differ, a picked name is missing, or a name comes twice."""
    if not sources:
        raise ValueError("nothing to merge")
    first_label, first, _ = sources[0]
    want = protocol_of(first)
    models: list[dict[str, Any]] = []
    runs = []
    for label, result, names in sources:
        got = protocol_of(result)
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        if diff:
            raise ValueError(f"{label} and {first_label} measured different protocols ({', '.join(diff)}): "
                             "not one table")
        by_name = {m["name"]: m for m in result["models"]}
        run = {"file": label, "code_version": result["code_version"], "created": result["created"]}
        for name in names if names is not None else list(by_name):
            if name not in by_name:
                raise ValueError(f"{label} has no model {name!r} (it has {', '.join(by_name)})")
            if any(m["name"] == name for m in models):
                raise ValueError(f"model {name!r} is picked twice; pick it from one run")
            models.append({"run": run} | by_name[name])  # a row of a merged report keeps its first run
        runs.append(run | {"seconds": result["seconds"], "machine": result.get("machine"), "torch": result["torch"],
                           "models": names if names is not None else list(by_name)})
    validation = next((r.get("torchattacks_validation") for _, r, _ in sources
                       if r.get("torchattacks_validation") and "skipped" not in r["torchattacks_validation"]), None)
    return first | {
        "code_version": ", ".join(dict.fromkeys(r["code_version"] for r in runs)),
        "created": max(r["created"] for r in runs),
        "seconds": sum(m["seconds"] for m in models),
        "merged_from": runs, "models": models, "torchattacks_validation": validation,
    }


def check_artifacts(result: dict[str, Any], root: str | Path) -> None:
    """Every merged model must match the verified artifact `root/<name>` (encoder, bank and vote): a row for
    files that are no longer shipped is refused, naming the model."""
    for m in result["models"]:
        path = Path(root) / m["name"]
        sha = verify_artifact(path).model_sha256
        if sha != m["model_sha256"]:
            raise ValueError(f"{path} holds model {sha[:12]}, the row from {m['run']['file']} measured "
                             f"{m['model_sha256'][:12]}: rerun the suite on it or pick another run")


def load_sources(texts: Sequence[str]) -> list[tuple[str, dict[str, Any], list[str] | None]]:
    """`parse_source` each, read its JSON; the label is the path as given."""
    out = []
    for text in texts:
        path, names = parse_source(text)
        out.append((str(path), json.loads(path.read_text()), names))
    return out
