"""The typed manifest (training.manifest) and the one way to change an artifact (training.artifact.update_artifact):
old manifests load and round-trip unchanged, optional keys may be absent, and an update keeps the artifact verifying."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from training.artifact import (
    BANK,
    CARD,
    ENCODER_WEIGHTS,
    MANIFEST,
    ArtifactError,
    load_artifact,
    update_artifact,
    verify_artifact,
    write_artifact,
)
from training.card import CARD_BEGIN, CARD_END, with_suite_section
from training.manifest import KnnSurrogate, Manifest

SHIPPED = sorted((Path(__file__).parents[2] / "artifacts").glob("*/manifest.json"))  # committed, read only


def _raw(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_manifests_round_trip_byte_for_byte(path: Path) -> None:
    """Read only: the committed artifacts are never rewritten, but a rewrite would reproduce them exactly."""
    text = path.read_text()
    assert json.dumps(Manifest.from_dict(json.loads(text)).to_dict(), indent=2) + "\n" == text


def test_a_manifest_missing_optional_keys_loads_with_the_defaults(tiny_artifact: Path) -> None:
    m = _raw(tiny_artifact)
    for key in ("description", "dataset", "bank_size", "training", "metrics"):
        del m[key]
    for section, keys in {"knn": ("metric", "vote"), "input": ("channels", "value_range", "resize"),
                          "encoder": ("proj_dim", "mean", "std", "embed_dim", "normalize", "onnx_max_abs_diff")
                          }.items():
        for key in keys:
            del m[section][key]
    (tiny_artifact / MANIFEST).write_text(json.dumps(m))
    art = load_artifact(tiny_artifact)
    assert (art.metric, art.k, art.input_size, art.spec.method, art.spec.description) == ("l2", 5, 32, "unknown", "")
    assert art.spec.bank_size is None and art.spec.metrics is None and art.spec.knn.surrogate is None
    out = art.spec.to_dict()  # absent sections stay absent; only real defaults are spelled out
    assert not {"dataset", "bank_size", "training", "metrics", "calibration"} & set(out)
    assert out["knn"] == {"k": 5, "metric": "l2", "vote": "majority"}


def test_unknown_keys_survive_a_round_trip(tiny_artifact: Path) -> None:
    m = _raw(tiny_artifact)
    m["added_later"] = {"x": 1}
    m["knn"]["index_hint"] = "ivf"
    assert Manifest.from_dict(m).to_dict() == m


def test_the_adversarial_rows_section_round_trips_in_place(tiny_artifact: Path) -> None:
    """`bank_adversarial` (satml harden-bank) is typed, written after bank_views and read back unchanged."""
    m = _raw(tiny_artifact)
    section = {"attack": "pgd_ce", "eps": 8 / 255, "steps": 5, "temperature": 0.1, "seed": 0, "chunk": 1000,
               "attacked": 64, "rows": 20}
    keys = list(m)
    m = {**{k: m[k] for k in keys[:keys.index("bank_size") + 1]}, "bank_adversarial": section,
         **{k: m[k] for k in keys[keys.index("bank_size") + 1:]}}
    parsed = Manifest.from_dict(m)
    assert parsed.bank_adversarial is not None and parsed.bank_adversarial.rows == 20
    assert json.dumps(parsed.to_dict()) == json.dumps(m)  # same keys, same order


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m["input"].pop("size"), "input.size"),
    (lambda m: m.update(input=[1, 2]), "input must be a JSON object"),
    (lambda m: m["knn"].update(k="many"), "many"),
    (lambda m: m.update(classes=[{"a": 1}, 2]), "classes must be"),
    (lambda m: m["metrics"].update(robust=[{"attack": "pgd"}]), "metrics.robust"),
    (lambda m: m.update(bank_adversarial={"attack": "pgd_ce", "eps": 0.03}), "bank_adversarial.steps"),
])
def test_a_malformed_section_is_refused_by_name(tiny_artifact: Path, edit: Any, match: str) -> None:
    m = _raw(tiny_artifact)
    m["metrics"] = {}
    edit(m)
    (tiny_artifact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=match):
        load_artifact(tiny_artifact)


def test_model_identity_includes_the_vote(tiny_artifact: Path) -> None:
    """The suite caches attack results under model_sha256: the same weights voting with another k are another
    model, while k = 75 / l2 / majority keeps the identity earlier caches were written under."""
    spec = verify_artifact(tiny_artifact)
    files = spec.files
    legacy = hashlib.sha256(f"{files[ENCODER_WEIGHTS]}:{files[BANK]}".encode()).hexdigest()
    ids = {}
    for k, metric in ((75, "l2"), (20, "l2"), (75, "cosine")):
        spec.knn.k, spec.knn.metric = k, metric
        ids[(k, metric)] = spec.model_sha256
    assert ids[(75, "l2")] == legacy
    assert len(set(ids.values())) == 3
    spec.knn.k, spec.knn.metric = 75, "l2"
    spec.encoder.mirror_average = True
    assert spec.model_sha256 not in ids.values()


def test_update_artifact_rehashes_and_the_update_round_trips(tiny_artifact: Path) -> None:
    before = verify_artifact(tiny_artifact)
    card = (tiny_artifact / CARD).read_text() + "\nmore\n"

    def edit(m: Manifest) -> None:
        m.description = "updated"
        m.knn.surrogate = KnnSurrogate(temperature=0.5, k=None, chosen_by="test")

    written = update_artifact(tiny_artifact, edit, {CARD: card.encode(), "plot.png": b"\x89PNG fake"})
    assert written.files[CARD] == _sha(tiny_artifact / CARD) and (tiny_artifact / CARD).read_text() == card
    assert written.files["plot.png"] == hashlib.sha256(b"\x89PNG fake").hexdigest()
    assert [written.files[f] for f in (ENCODER_WEIGHTS, BANK)] == [before.files[f] for f in (ENCODER_WEIGHTS, BANK)]
    assert written.model_sha256 == before.model_sha256  # the served model's identity does not change
    assert _raw(tiny_artifact) == written.to_dict()
    art = load_artifact(tiny_artifact)  # still verifies
    assert art.spec.description == "updated" and art.spec.knn.surrogate == KnnSurrogate(temperature=0.5, k=None,
                                                                                        chosen_by="test")
    assert art.manifest["knn"]["surrogate"] == {"temperature": 0.5, "k": None, "chosen_by": "test"}
    assert not list(tiny_artifact.glob("*.tmp"))


def test_update_artifact_refuses_a_tampered_artifact_and_blesses_nothing(tiny_artifact: Path) -> None:
    (tiny_artifact / BANK).write_bytes((tiny_artifact / BANK).read_bytes()[:-1] + b"\x00")
    before = (tiny_artifact / MANIFEST).read_text()
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        update_artifact(tiny_artifact, files={CARD: b"# new card\n"})
    assert (tiny_artifact / MANIFEST).read_text() == before and (tiny_artifact / CARD).read_text() != "# new card\n"


def test_an_edit_that_refuses_leaves_the_folder_untouched(tiny_artifact: Path) -> None:
    before = {p.name: p.read_bytes() for p in tiny_artifact.iterdir()}

    def refuse(m: Manifest) -> None:
        raise ValueError("not this model")

    with pytest.raises(ValueError, match="not this model"):
        update_artifact(tiny_artifact, refuse, {CARD: b"# new card\n"})
    assert {p.name: p.read_bytes() for p in tiny_artifact.iterdir()} == before


@pytest.mark.parametrize("name", ["../outside.txt", "sub/x.png", ".."])
def test_update_artifact_writes_only_plain_names(tiny_artifact: Path, name: str) -> None:
    card = (tiny_artifact / CARD).read_bytes()
    with pytest.raises(ArtifactError, match="plain name"):
        update_artifact(tiny_artifact, files={CARD: b"# new card\n", name: b"x"})
    assert (tiny_artifact / CARD).read_bytes() == card  # nothing written, not even the good name
    verify_artifact(tiny_artifact)


def test_write_artifact_needs_weights_and_bank(tiny_artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="needs"):
        write_artifact(tiny_artifact, verify_artifact(tiny_artifact), [ENCODER_WEIGHTS])


def test_the_suite_section_is_replaced_not_repeated() -> None:
    card = "# Model card: x\n\nexported text\n"
    once = with_suite_section(card, f"{CARD_BEGIN}\nfirst\n{CARD_END}\n")
    twice = with_suite_section(once, f"{CARD_BEGIN}\nsecond\n{CARD_END}\n")
    assert twice.count(CARD_BEGIN) == 1 and "second" in twice and "first" not in twice
    assert twice.startswith(card.rstrip("\n"))
