"""Liveness and readiness: ready only with a model, reporting device, runtime and index per model."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import png, toy_images


def test_live(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}


def test_ready_reports_models_and_skipped(client: TestClient) -> None:
    r = client.get("/health/ready")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["default_model"] == "default"
    assert set(body["models"]) == {"default", "other"}
    for m in body["models"].values():
        # the default runtime auto serves the toy artifacts' encoder.onnx with onnxruntime on a CPU
        assert m["device"] == "cpu" and m["runtime"] == "onnxruntime (CPUExecutionProvider)" and m["index"] == "torch"
        assert m["classes"] == 3 and m["bank_size"] == 192
    assert set(body["skipped"]) == {"bad_sha", "bad_version", "not_an_artifact"}


def test_not_ready_without_models(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path))) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready" and r.json()["error"]["code"] == "not_ready"
        assert c.get("/health/live").status_code == 200
        img = png(toy_images(1, 0)[0][0])
        assert c.post("/classify", files={"file": ("a.png", img, "image/png")}).status_code == 503
        assert c.get("/models").json() == {"default_model": None, "models": []}


def test_onnxruntime_is_reported(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, runtime="onnxruntime"))) as c:
        runtimes = {m["runtime"] for m in c.get("/health/ready").json()["models"].values()}
        assert runtimes == {"onnxruntime (CPUExecutionProvider)"}
