"""Conformal credibility and abstention in /classify (calibration scores from the artifact)."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import CLASSES, SIZE, K, png, toy_encoder, toy_images
from training import knn
from training.calibrate import write_calibration
from training.export import export_artifact

CALIBRATION = torch.tensor([0] * 20 + [2] * 20)  # half the calibration inputs unanimous, half with 2 dissenters


def expected_credibility(top_share: float) -> float:
    """p-value of the predicted class under CALIBRATION for a vote with this top share of K neighbours."""
    dissent = round(K * (1 - top_share))
    return 1.0 if dissent == 0 else 0.5 if dissent <= 2 else 0.0


@pytest.fixture(scope="module")
def calibrated_root(good_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`default`: a toy encoder whose bank labels are shuffled, so the k neighbours' votes split, with the
    calibration scores above; `other`: the plain toy model, without calibration."""
    root = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(good_root / "other", root / "other")
    encoder = toy_encoder(0)
    images, labels = toy_images(64, 100)
    shuffled = torch.as_tensor(labels)[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    training = {"method": "sat", "hyperparameters": {}, "epochs": 0, "seed": 0, "code_version": "test"}
    export_artifact(root / "default", encoder, knn.embed(encoder, images), shuffled, name="split", classes=CLASSES,
                    dataset="toy-colours", training=training, input_size=SIZE, k=K, bank_dtype=torch.float32,
                    onnx=False)
    write_calibration(root / "default", CALIBRATION, {"n": len(CALIBRATION), "split": "test fixture"})
    return root


@pytest.fixture(scope="module")
def client(calibrated_root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(calibrated_root)), raise_server_exceptions=False) as c:
        yield c


def _files(n: int = 24) -> list[tuple[str, tuple[str, bytes, str]]]:
    pixels, _ = toy_images(8, seed=11)
    return [("files", (f"{i}.png", png(p), "image/png")) for i, p in enumerate(pixels[:n])]


def test_credibility_follows_the_vote(client: TestClient) -> None:
    r = client.post("/classify", files=_files(), data={"top_k": "3"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for res in results:
        assert res["credibility"] == expected_credibility(res["votes"][0]["share"])
        assert 0.0 <= res["confidence"] <= 1.0 and res["abstained"] is False  # default threshold 0
    assert len({res["credibility"] for res in results}) > 1, "the fixture must produce split and clear votes"


def test_abstains_below_the_requested_threshold(client: TestClient) -> None:
    r = client.post("/classify", files=_files(), data={"min_credibility": "0.75", "top_k": "3"})
    assert r.status_code == 200
    results = r.json()["results"]
    for res in results:
        assert res["abstained"] == (res["credibility"] < 0.75) and res["label"]  # label kept for information
    assert any(res["abstained"] for res in results)


def test_model_without_calibration(client: TestClient) -> None:
    res = client.post("/classify", files=_files(1), data={"model": "other"}).json()["results"][0]
    assert res["credibility"] is None and res["confidence"] is None and res["abstained"] is False
    r = client.post("/classify", files=_files(1), data={"model": "other", "min_credibility": "0.2"})
    assert r.status_code == 422 and "no calibration" in r.json()["error"]["message"]
    r = client.post("/classify", files=_files(1), data={"min_credibility": "1.5"})
    assert r.status_code == 422


def test_server_wide_threshold(calibrated_root: Path) -> None:
    settings = make_settings(calibrated_root, min_credibility=1.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        results = c.post("/classify", files=_files()).json()["results"]
        assert all(res["abstained"] == (res["credibility"] < 1.0) for res in results)
        assert any(res["abstained"] for res in results)


def test_open_inference_protocol_reports_credibility(client: TestClient) -> None:
    meta = client.get("/v2/models/default").json()
    assert "credibility" in [o["name"] for o in meta["outputs"]]
    assert "credibility" not in [o["name"] for o in client.get("/v2/models/other").json()["outputs"]]
    files = [base64.b64encode(f[1][1]).decode() for f in _files()]
    body = {"inputs": [{"name": "image_files", "shape": [len(files)], "datatype": "BYTES", "data": files}]}
    out = {o["name"]: o for o in client.post("/v2/models/default/infer", json=body).json()["outputs"]}
    results = client.post("/classify", files=_files()).json()["results"]
    assert out["credibility"]["data"] == [res["credibility"] for res in results]
