"""GET /models and /models/{name}: manifests, metrics, cards; 404 JSON for unknown names."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.app.toy import CLASSES


def test_list(client: TestClient) -> None:
    body = client.get("/models").json()
    assert body["default_model"] == "default"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"default", "other"}  # the bad artifacts are not listed
    d = by_name["default"]
    assert d["default"] is True and by_name["other"]["default"] is False
    assert d["artifact_name"] == "toy-sat" and d["classes"] == CLASSES and d["input_size"] == 32
    assert d["training_method"] == "sat" and by_name["other"]["training_method"] == "supervised"
    assert d["encoder"]["arch"] == "resnet10" and d["knn"]["k"] == 5 and d["metrics"]["clean_acc"] == 1.0
    assert (d["device"], d["runtime"], d["index"]) == ("cpu", "onnxruntime (CPUExecutionProvider)", "torch")


def test_detail_with_manifest_and_card(client: TestClient) -> None:
    body = client.get("/models/other").json()
    assert body["name"] == "other" and body["manifest"]["name"] == "toy-supervised"
    assert "sha256" not in body["manifest"] and "bank.safetensors" in body["manifest"]["files"]
    assert body["card"].startswith("# Model card: toy-supervised")


def test_unknown_model_is_404_json(client: TestClient) -> None:
    for path in ("/models/nope", "/models/bad_sha", "/models/nope/files/card.md"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", path


def test_card_files_only(client: TestClient) -> None:
    r = client.get("/models/default/files/card.md")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    for name in ("bank.safetensors", "manifest.json", "encoder.onnx", "..%2Fother%2Fcard.md", "missing.png"):
        assert client.get(f"/models/default/files/{name}").status_code == 404, name
