"""Artifact contract (DESIGN section 3): export writes every file, hashes verify, round trip is exact,
ONNX matches torch, and anything tampered or unknown is refused with ArtifactError."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.training.conftest import TINY_ENCODER
from training import knn
from training.artifact import (
    BANK,
    CARD,
    ENCODER_ONNX,
    ENCODER_WEIGHTS,
    FORMAT_VERSION,
    MANIFEST,
    ArtifactError,
    load_artifact,
    verify_artifact,
)
from training.export import ONNX_ATOL, code_version, export_artifact, export_onnx, share_weights
from training.models import Encoder, EncoderConfig

CLASSES = ["a", "b", "c"]
TRAINING = {"method": "sat", "hyperparameters": {"eps": 8 / 255}, "epochs": 1, "seed": 0, "code_version": "test"}
METRICS = {"clean_acc": 0.5, "clean_n": 12,
           "robust": [{"attack": "pgd_soft_knn", "norm": "linf", "eps": 8 / 255, "steps": 10, "acc": 0.25, "n": 4}]}


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _encoder() -> Encoder:
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(**TINY_ENCODER))
    enc.train()(_images(8, 99))  # non-trivial BatchNorm statistics, which the artifact must carry
    return enc.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Encoder, torch.Tensor, torch.Tensor]:
    """One exported artifact (with ONNX) shared read-only by the module; copy it before tampering."""
    enc = _encoder()
    bank = knn.embed(enc, _images(12, 1))
    labels = torch.arange(12) % 3
    out = export_artifact(tmp_path_factory.mktemp("art") / "tiny", enc, bank, labels, name="tiny",
                          classes=CLASSES, dataset="synthetic", training=TRAINING, metrics=METRICS,
                          description="a test model", input_size=16, k=5)
    return out, enc, bank, labels


@pytest.fixture
def copy(exported: tuple[Path, Encoder, torch.Tensor, torch.Tensor], tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported[0], tmp_path / "tiny"))


def _edit_manifest(folder: Path, **changes: Any) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    m.update(changes)
    (folder / MANIFEST).write_text(json.dumps(m))


def _rehash(folder: Path) -> None:
    """Make the manifest's hashes match the files again (a consistent artifact with bad content)."""
    m = json.loads((folder / MANIFEST).read_text())
    m["files"] = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in m["files"]}
    (folder / MANIFEST).write_text(json.dumps(m))


# ---------------------------------------------------------------- what export writes


def test_export_writes_every_file_with_verified_hashes(exported: tuple[Path, Encoder, torch.Tensor, torch.Tensor]
                                                       ) -> None:
    out, enc, bank, _ = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, ENCODER_WEIGHTS, ENCODER_ONNX, BANK, CARD])
    m = json.loads((out / MANIFEST).read_text())
    assert set(m["files"]) == {ENCODER_WEIGHTS, ENCODER_ONNX, BANK, CARD}
    for name, digest in m["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert verify_artifact(out).to_dict() == m  # the typed manifest round-trips what export wrote
    # the manifest describes itself as DESIGN section 3 says
    assert m["format_version"] == FORMAT_VERSION and m["name"] == "tiny" and m["classes"] == CLASSES
    assert m["dataset"] == "synthetic" and m["description"] == "a test model" and m["bank_size"] == 12
    assert m["input"]["size"] == 16 and m["input"]["channels"] == 3 and m["input"]["value_range"] == [0.0, 1.0]
    np.testing.assert_allclose(m["input"]["mean"], enc.cfg.mean)
    np.testing.assert_allclose(m["input"]["std"], enc.cfg.std)
    assert {k: m["encoder"][k] for k in ("arch", "width", "embed_dim", "normalize")} == {
        "arch": "resnet10", "width": 4, "embed_dim": 32, "normalize": True}
    assert m["knn"] == {"k": 5, "metric": "l2", "vote": "majority"}
    assert m["training"] == TRAINING and m["metrics"] == json.loads(json.dumps(METRICS))
    assert 0 <= m["encoder"]["onnx_max_abs_diff"] <= ONNX_ATOL
    # weights and bank are safetensors (never pickle); the bank is fp16 by default
    stored = load_file(out / BANK)
    assert stored["embeddings"].dtype == torch.float16 and stored["labels"].dtype == torch.int64
    assert set(load_file(out / ENCODER_WEIGHTS)) == set(enc.state_dict())
    assert bank.shape == (12, 32)


def test_card_states_method_and_measured_accuracy(exported: tuple[Path, Encoder, torch.Tensor, torch.Tensor]
                                                  ) -> None:
    card = (exported[0] / CARD).read_text()
    assert card.startswith("# Model card: tiny")
    assert "`sat`" in card and "50.00 %" in card and "25.00 %" in card and "eps 8/255" in card


# ---------------------------------------------------------------- round trip


def test_load_round_trip_gives_identical_embeddings(exported: tuple[Path, Encoder, torch.Tensor, torch.Tensor]
                                                    ) -> None:
    out, enc, bank, labels = exported
    art = load_artifact(out)
    assert not art.encoder.training
    assert (art.name, art.classes, art.num_classes, art.k, art.metric, art.input_size) == (
        "tiny", CLASSES, 3, 5, "l2", 16)
    x = _images(5, 2)
    with torch.no_grad():
        assert torch.equal(art.encoder(x), enc(x))
    assert art.bank.dtype == torch.float32
    assert torch.equal(art.bank, bank.half().float()) and torch.equal(art.bank_labels, labels)


def test_float32_bank_round_trips_exactly(tmp_path: Path) -> None:
    enc = _encoder()
    bank = knn.embed(enc, _images(6, 3))
    out = export_artifact(tmp_path / "f32", enc, bank, torch.arange(6) % 3, name="f32", classes=CLASSES,
                          dataset="synthetic", training=TRAINING, input_size=16, bank_dtype=torch.float32, onnx=False)
    assert ENCODER_ONNX not in json.loads((out / MANIFEST).read_text())["files"]
    assert torch.equal(load_artifact(out).bank, bank)


def test_onnx_parity_with_dynamic_batch(exported: tuple[Path, Encoder, torch.Tensor, torch.Tensor]) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out, enc, _, _ = exported
    model = onnx.load(str(out / ENCODER_ONNX))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(out / ENCODER_ONNX), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["embeddings"]
    for b in (1, 7):  # neither is the batch size the export traced with
        x = _images(b, 10 + b)
        with torch.no_grad():
            ref = enc(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=ONNX_ATOL, rtol=0)


def test_onnx_holds_no_second_copy_of_the_weights(exported: tuple[Path, Encoder, torch.Tensor, torch.Tensor]
                                                  ) -> None:
    """Every parameter and buffer of the graph is read from encoder.safetensors (ONNX external data), so the
    ONNX file is its graph only; `onnx.load` brings the weights in, and a session from those bytes matches."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out, enc, _, _ = exported
    bare = onnx.load(str(out / ENCODER_ONNX), load_external_data=False)
    external = [i for i in bare.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= sum(1 for _ in enc.parameters())
    assert {e.value for i in external for e in i.external_data if e.key == "location"} == {ENCODER_WEIGHTS}
    inline = sum(len(i.raw_data) for i in bare.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL)
    assert inline < 1024, f"{inline} bytes of weights still inline"
    full = onnx.load(str(out / ENCODER_ONNX))  # the weights read from beside it
    session = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _images(3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], enc(x).numpy(), atol=ONNX_ATOL, rtol=0)


def test_share_weights_refuses_a_weights_file_that_differs(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    enc = _encoder()
    export_onnx(enc, tmp_path / ENCODER_ONNX, 16)  # folded: no initializer links
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, tmp_path / ENCODER_WEIGHTS)
    assert share_weights(tmp_path / ENCODER_ONNX, tmp_path / ENCODER_WEIGHTS) < sum(1 for _ in enc.parameters())
    other = {k: (v + 1 if v.is_floating_point() else v).contiguous() for k, v in enc.state_dict().items()}
    save_file(other, tmp_path / ENCODER_WEIGHTS)
    torch.onnx.export(enc.eval(), (torch.rand(1, 3, 16, 16),), str(tmp_path / ENCODER_ONNX), dynamo=False,
                      do_constant_folding=False)
    with pytest.raises(ValueError, match="differs from the tensor"):
        share_weights(tmp_path / ENCODER_ONNX, tmp_path / ENCODER_WEIGHTS)


def test_export_without_onnx_removes_a_stale_graph(exported: tuple[Path, Encoder, torch.Tensor, torch.Tensor],
                                                   tmp_path: Path) -> None:
    folder = Path(shutil.copytree(exported[0], tmp_path / "again"))
    enc = _encoder()
    export_artifact(folder, enc, knn.embed(enc, _images(4, 5)), torch.tensor([0, 1, 2, 0]), name="again",
                    classes=CLASSES, dataset="synthetic", training=TRAINING, input_size=16, onnx=False)
    assert not (folder / ENCODER_ONNX).exists()


def test_export_again_replaces_the_files(copy: Path) -> None:
    enc = _encoder()
    bank = knn.embed(enc, _images(4, 5))
    export_artifact(copy, enc, bank, torch.tensor([0, 1, 2, 0]), name="again", classes=CLASSES,
                    dataset="synthetic", training=TRAINING, input_size=16, onnx=False)
    art = load_artifact(copy)
    assert art.name == "again" and len(art.bank) == 4


def test_code_version_is_a_string() -> None:
    v = code_version()
    assert isinstance(v, str) and v


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", [ENCODER_WEIGHTS, ENCODER_ONNX, BANK, CARD])
def test_a_tampered_file_is_refused(copy: Path, name: str) -> None:
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=re.escape(f"{name}: sha256 mismatch")):
        verify_artifact(copy)
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_artifact(copy)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_format_version_is_refused(copy: Path, version: object) -> None:
    _edit_manifest(copy, format_version=version)
    with pytest.raises(ArtifactError, match="format_version"):
        load_artifact(copy)


def test_missing_or_unreadable_manifest(copy: Path) -> None:
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        verify_artifact(copy)
    (copy / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON object"):
        verify_artifact(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        verify_artifact(copy)
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        verify_artifact(copy / "does-not-exist")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"classes": None}, "missing key 'classes'"),
        ({"files": {BANK: "0" * 64}}, "lacks encoder.safetensors"),
        ({"files": [ENCODER_WEIGHTS, BANK]}, "files"),
        ({"files": "encoder.safetensors bank.safetensors"}, "files"),
        ({"files": {ENCODER_WEIGHTS: None, BANK: None}}, "files"),
        ({"classes": "abc"}, "classes must be"),
        ({"classes": []}, "classes must be"),
    ],
)
def test_malformed_manifest_is_refused(copy: Path, change: dict[str, Any], match: str) -> None:
    m = json.loads((copy / MANIFEST).read_text())
    m.update({k: v for k, v in change.items() if v is not None})
    for k in [k for k, v in change.items() if v is None]:
        del m[k]
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=match):
        load_artifact(copy)


def test_listed_file_missing_or_outside_the_folder(copy: Path) -> None:
    (copy / CARD).unlink()
    with pytest.raises(ArtifactError, match=r"card\.md is missing"):
        verify_artifact(copy)
    (copy.parent / "outside.txt").write_text("x")
    m = json.loads((copy / MANIFEST).read_text())
    m["files"] = {**m["files"], "../outside.txt": hashlib.sha256(b"x").hexdigest()}
    m["files"].pop(CARD)
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="plain name"):
        verify_artifact(copy)


def test_weights_that_do_not_fit_the_manifest_are_refused(copy: Path) -> None:
    m = json.loads((copy / MANIFEST).read_text())
    _edit_manifest(copy, encoder={**m["encoder"], "width": 8})  # hashes still fine, shapes are not
    with pytest.raises(ArtifactError, match="cannot load"):
        load_artifact(copy)


@pytest.mark.parametrize(
    ("embeddings", "labels", "match"),
    [
        (torch.zeros(4, 32), torch.tensor([0, 1, 2, 3]), "bank labels outside"),
        (torch.zeros(4, 32), torch.tensor([0, 1, -1, 2]), "bank labels outside"),
        (torch.zeros(4, 16), torch.tensor([0, 1, 2, 0]), "bank shape"),
        (torch.zeros(4, 32), torch.tensor([0, 1, 2]), "bank shape"),
    ],
)
def test_inconsistent_bank_is_refused(copy: Path, embeddings: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    save_file({"embeddings": embeddings, "labels": labels}, copy / BANK)
    _rehash(copy)
    with pytest.raises(ArtifactError, match=match):
        load_artifact(copy)


def test_bank_without_labels_is_refused(copy: Path) -> None:
    save_file({"embeddings": torch.zeros(4, 32)}, copy / BANK)
    _rehash(copy)
    with pytest.raises(ArtifactError, match="cannot load"):
        load_artifact(copy)


def test_export_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    enc = _encoder()
    bank = knn.embed(enc, _images(4, 6))
    kw: dict[str, Any] = {"name": "x", "classes": CLASSES, "dataset": "synthetic", "input_size": 16, "onnx": False}
    with pytest.raises(ValueError, match="labels"):
        export_artifact(tmp_path / "a", enc, bank, torch.tensor([0, 1, 2, 3]), training=TRAINING, **kw)
    with pytest.raises(ValueError, match="bank"):
        export_artifact(tmp_path / "b", enc, bank[:, :8], torch.tensor([0, 1, 2, 0]), training=TRAINING, **kw)
    with pytest.raises(ValueError, match="training"):
        export_artifact(tmp_path / "c", enc, bank, torch.tensor([0, 1, 2, 0]), training={"method": "sat"}, **kw)
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abc")  # nothing half-written


def test_bank_views_must_be_one_or_two_and_divide_the_rows(tmp_path: Path) -> None:
    enc = _encoder()
    bank = knn.embed(enc, _images(6, 3))
    for views in (3, 4):
        with pytest.raises(ValueError, match="bank_views"):
            export_artifact(tmp_path / "v", enc, bank, torch.arange(6) % 3, name="v", classes=CLASSES,
                            dataset="synthetic", training=TRAINING, input_size=16, onnx=False, bank_views=views)
    out = export_artifact(tmp_path / "v2", enc, bank, torch.arange(6) % 3, name="v2", classes=CLASSES,
                          dataset="synthetic", training=TRAINING, input_size=16, onnx=False, bank_views=2)
    m = json.loads((out / MANIFEST).read_text())
    assert (m["bank_size"], m["bank_views"]) == (3, 2)
    one = export_artifact(tmp_path / "v1", enc, bank, torch.arange(6) % 3, name="v1", classes=CLASSES,
                          dataset="synthetic", training=TRAINING, input_size=16, onnx=False)
    assert "bank_views" not in json.loads((one / MANIFEST).read_text())  # old manifests' shape unchanged
