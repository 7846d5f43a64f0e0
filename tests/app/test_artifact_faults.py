"""Issue 13, defect 6: one malformed artifact never stops start-up; it is skipped with a log line."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import png, toy_images
from training.artifact import sha256_file

GOOD = png(toy_images(1, 3)[0][0])


def rehash(folder: Path) -> None:
    """Make the manifest's sha256 digests match the (tampered) files again."""
    p = folder / "manifest.json"
    manifest = json.loads(p.read_text())
    manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"]}
    p.write_text(json.dumps(manifest))


def corrupt_weights(folder: Path) -> None:
    (folder / "bank.safetensors").write_bytes(b"\xff" * 64)  # not safetensors at all, hash matching
    rehash(folder)


def truncated_weights(folder: Path) -> None:
    p = folder / "encoder.safetensors"
    p.write_bytes(p.read_bytes()[:200])
    rehash(folder)


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        p = folder / "manifest.json"
        manifest = json.loads(p.read_text())
        edit(manifest)
        p.write_text(json.dumps(manifest))
    return apply


FAULTS: dict[str, Callable[[Path], None]] = {
    "corrupt_bank": corrupt_weights,
    "truncated_encoder": truncated_weights,
    "no_input_size": edit_manifest(lambda m: m["input"].pop("size")),
    "no_knn_k": edit_manifest(lambda m: m["knn"].pop("k")),
    "k_not_a_number": edit_manifest(lambda m: m["knn"].update(k="many")),
    "input_not_a_dict": edit_manifest(lambda m: m.update(input=[1, 2])),
    "size_zero": edit_manifest(lambda m: m["input"].update(size=0)),
    "classes_not_strings": edit_manifest(lambda m: m.update(classes=[{"a": 1}, 2, None])),
}


@pytest.fixture(scope="module")
def faulty_root(good_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts_faulty")
    for name in ("default", "other"):
        shutil.copytree(good_root / name, root / name)
    for name, fault in FAULTS.items():
        shutil.copytree(good_root / "default", root / name)
        fault(root / name)
    return root


def test_every_malformed_artifact_is_skipped_and_logged(faulty_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.registry")
    with TestClient(create_app(make_settings(faulty_root)), raise_server_exceptions=False) as c:
        r = c.get("/health/ready")
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["models"]) == {"default", "other"}
        assert set(body["skipped"]) == set(FAULTS)
        assert all(reason for reason in body["skipped"].values())
        r = c.post("/classify", files={"file": ("x.png", GOOD, "image/png")})
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "red"
        for name in FAULTS:
            r = c.post("/classify", files={"file": ("x.png", GOOD, "image/png")}, data={"model": name})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    logged = {getattr(r, "fields", {}).get("model") for r in caplog.records
              if getattr(r, "fields", {}).get("event") == "artifact_skipped"}
    assert set(FAULTS) <= logged
