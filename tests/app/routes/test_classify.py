"""POST /classify over the toy artifacts: known answers, batching of multi-file requests, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import CLASSES, png, toy_images


def as_files(images: np.ndarray, field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"img{i}.png", png(x), "image/png")) for i, x in enumerate(images)]


def test_several_files_known_labels(client: TestClient) -> None:
    images, labels = toy_images(3, seed=21)
    r = client.post("/classify", files=as_files(images))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "default" and body["latency_ms"] > 0
    assert [res["label"] for res in body["results"]] == [CLASSES[c] for c in labels]
    assert [res["filename"] for res in body["results"]] == [f"img{i}.png" for i in range(len(images))]
    for res in body["results"]:
        assert set(res) == {"filename", "label", "class_id", "votes", "width", "height", "credibility", "confidence",
                            "abstained"}
        assert res["credibility"] is None and res["abstained"] is False  # the toy model has no calibration
        assert (res["width"], res["height"]) == (32, 32)
        shares = [v["share"] for v in res["votes"]]
        assert len(shares) == 3 and shares == sorted(shares, reverse=True) and abs(sum(shares) - 1) < 1e-9
        assert res["votes"][0]["class_id"] == res["class_id"]


def test_single_file_field_other_model_and_top_k(client: TestClient) -> None:
    images, labels = toy_images(1, seed=22)
    r = client.post("/classify", files=as_files(images[2:3], "file"), data={"model": "other", "top_k": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "other" and body["results"][0]["label"] == CLASSES[labels[2]]
    assert len(body["results"][0]["votes"]) == 1


def test_both_fields_are_accepted_together(client: TestClient) -> None:
    images, _ = toy_images(1, seed=23)
    files = as_files(images[:2]) + as_files(images[2:], "file")
    assert len(client.post("/classify", files=files).json()["results"]) == 3


def test_any_size_is_squashed_and_reported(client: TestClient) -> None:
    wide = np.zeros((20, 50, 3), np.uint8)
    wide[...] = (230, 25, 25)
    res = client.post("/classify", files=as_files(wide[None])).json()["results"][0]
    assert (res["width"], res["height"], res["label"]) == (50, 20, "red")


def test_parameter_errors(client: TestClient) -> None:
    images, _ = toy_images(1, seed=24)
    one = as_files(images[:1])
    cases = [
        (dict(files=one, data={"top_k": "4"}), 422),  # 3 classes
        (dict(files=one, data={"top_k": "0"}), 422),
        (dict(files=one, data={"top_k": "many"}), 422),
        (dict(files=one, data={"model": "nope"}), 404),
        (dict(data={"model": "default"}), 422),  # no file
        (dict(files=[("files", ("a.png", b"", "image/png"))]), 400),
    ]
    for kw, status in cases:
        r = client.post("/classify", **kw)
        assert r.status_code == status, (kw.get("data"), r.text)
        assert set(r.json()["error"]) == {"code", "message"}


def test_too_many_files(good_root: Path) -> None:
    images, _ = toy_images(1, seed=25)
    with TestClient(create_app(make_settings(good_root, max_files_per_request=2))) as c:
        r = c.post("/classify", files=as_files(images))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"


def test_multi_file_request_is_one_batch(good_root: Path) -> None:
    images, _ = toy_images(3, seed=26)
    app = create_app(make_settings(good_root, max_wait_ms=0))
    with TestClient(app) as c:
        assert c.post("/classify", files=as_files(images)).status_code == 200
        registry = app.state.metrics.registry
        labels = {"model": "default"}
        assert registry.get_sample_value("satml_inference_batch_size_count", labels) == 1  # one forward pass
        assert registry.get_sample_value("satml_inference_batch_size_sum", labels) == 9  # of all 9 images
