"""POST /attack: every method, bounds, targets, comparisons, API key, queue limits."""

from __future__ import annotations

import base64
import io
import typing
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.routes.attack import Method
from tests.app.conftest import make_settings
from tests.app.toy import png, toy_images
from training.knn_attacks import API_METHODS, Surrogate

RED = toy_images(1, seed=31)[0][0]


def post(c: TestClient, image: np.ndarray = RED, **data: object):
    return c.post("/attack", files={"file": ("x.png", png(image), "image/png")},
                  data={k: (v if isinstance(v, list) else str(v)) for k, v in data.items()})


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


METHODS = typing.get_args(Method)


def test_methods_come_from_the_training_library() -> None:
    assert set(METHODS) == {"fgsm", "pgd", "knn_pgd", "adaptive"} == set(API_METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_each_method(client: TestClient, method: str) -> None:
    eps = 8 / 255
    r = post(client, method=method, eps=eps, steps=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "default" and body["method"] == method and body["steps"] == (1 if method == "fgsm" else 3)
    assert body["clean"]["label"] == "red"  # the attacked label is the model's own clean prediction
    assert body["success"] == (body["adversarial"]["label"] != body["clean"]["label"])
    assert 0 < body["linf"] <= eps + 1e-6 and body["l2"] >= body["linf"]
    adv = decode_png(body["adversarial_png"])
    assert adv.shape == (32, 32, 3) and np.abs(adv.astype(int) - RED.astype(int)).max() <= round(eps * 255) + 1
    pert = decode_png(body["perturbation_png"])
    assert pert.shape == (32, 32, 3) and (pert.max() >= 250 or pert.min() <= 5)  # amplified to the full range
    assert body["compare"] == [] and body["target"] is None and body["latency_ms"] > 0


def test_pgd_flips_the_toy_model_at_16(client: TestClient) -> None:
    body = post(client, method="pgd", eps=16 / 255, steps=10).json()
    assert body["success"] is True and body["adversarial"]["label"] != "red"


def test_returned_png_is_what_was_scored(client: TestClient) -> None:
    body = post(client, method="pgd", eps=0.03, steps=10).json()  # eps off the 1/255 grid
    adv = decode_png(body["adversarial_png"])
    assert np.abs(adv.astype(int) - RED.astype(int)).max() <= 0.03 * 255
    assert body["linf"] == pytest.approx(np.abs(adv.astype(int) - RED.astype(int)).max() / 255, abs=1e-6)
    again = client.post("/classify", files={"file": ("adv.png", base64.b64decode(body["adversarial_png"]),
                                                     "image/png")}).json()["results"][0]
    assert again["label"] == body["adversarial"]["label"] and again["votes"] == body["adversarial"]["votes"]


def test_targeted_by_name_and_id(client: TestClient) -> None:
    for target in ("blue", "2"):
        body = post(client, method="pgd", eps=16 / 255, steps=10, target=target).json()
        assert body["target"] == {"label": "blue", "class_id": 2}
        assert body["success"] == (body["adversarial"]["label"] == "blue")


def test_compare_transfer_and_attack_in_turn(client: TestClient) -> None:
    r = client.post("/attack", files={"file": ("x.png", png(RED), "image/png")},
                    data={"compare": ["other", "default,other"], "steps": "2"})
    assert r.status_code == 200, r.text
    [cmp] = r.json()["compare"]
    assert cmp["model"] == "other"
    assert set(cmp["transfer"]) == {"clean", "adversarial", "success"}
    assert set(cmp["attack"]) == {"clean", "adversarial", "success", "linf", "l2", "adversarial_png",
                                  "perturbation_png"}
    assert cmp["transfer"]["clean"]["label"] == "red"


@pytest.mark.parametrize("data, status", [
    ({"eps": 17 / 255}, 422),
    ({"eps": -0.01}, 422),
    ({"eps": "nan"}, 422),
    ({"steps": 101}, 422),
    ({"steps": 0}, 422),
    ({"method": "cw"}, 422),
    ({"target": "purple"}, 422),
    ({"target": "3"}, 422),
    ({"model": "nope"}, 404),
    ({"compare": "nope"}, 404),
])
def test_bad_parameters(client: TestClient, data: dict, status: int) -> None:
    r = post(client, **data)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"code", "message"}


def test_missing_file(client: TestClient) -> None:
    r = client.post("/attack", data={"method": "pgd"})
    assert r.status_code == 422 and "file" in r.json()["error"]["message"]


def test_api_key_guards_attack_only(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, api_key="s3cret"))) as c:
        assert post(c, steps=1).status_code == 401
        r = c.post("/attack", headers={"X-API-Key": "wrong"}, files={"file": ("x.png", png(RED), "image/png")})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = c.post("/attack", headers={"X-API-Key": "s3cret"}, files={"file": ("x.png", png(RED), "image/png")},
                   data={"steps": "1"})
        assert r.status_code == 200
        assert c.post("/classify", files={"file": ("x.png", png(RED), "image/png")}).status_code == 200


def test_full_queue_answers_429_with_retry_after(good_root: Path) -> None:
    app = create_app(make_settings(good_root, attack_concurrency=1, attack_queue=0))
    with TestClient(app) as c:
        attacks = app.state.attacks
        attacks._active = attacks.capacity  # as if one attack were running
        r = post(c, steps=1)
        assert r.status_code == 429 and r.json()["error"]["code"] == "attack_queue_full"
        assert int(r.headers["Retry-After"]) >= 1
        attacks._active = 0
        assert post(c, steps=1).status_code == 200
        assert c.post("/classify", files={"file": ("x.png", png(RED), "image/png")}).status_code == 200
        text = c.get("/metrics").text
        assert 'satml_attacks_total{method="pgd",model="default",outcome="rejected"} 1.0' in text


def test_timeout_answers_504(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, attack_timeout_s=1e-4))) as c:
        r = post(c, steps=100)
        assert r.status_code == 504 and r.json()["error"]["code"] == "attack_timeout"
        assert c.get("/health/live").status_code == 200


def test_attack_uses_the_surrogate_recorded_by_the_suite(good_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """manifest knn.surrogate (written by `satml robustness --update-cards`) steers /attack's soft-kNN."""
    import json
    import shutil

    import app.attack as attack_module
    from training.artifact import MANIFEST

    root = tmp_path / "artifacts"
    shutil.copytree(good_root / "default", root / "default")
    manifest = json.loads((root / "default" / MANIFEST).read_text())
    manifest["knn"]["surrogate"] = {"temperature": 0.5, "k": 3, "chosen_by": "test"}
    (root / "default" / MANIFEST).write_text(json.dumps(manifest))
    seen: list[Surrogate] = []
    real = attack_module.craft

    def spy(*args, **kwargs):
        seen.append(kwargs["surrogate"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attack_module, "craft", spy)
    with TestClient(create_app(make_settings(root)), raise_server_exceptions=False) as c:
        assert post(c, method="pgd", eps=8 / 255, steps=2).status_code == 200
    assert seen == [Surrogate(0.5, 3)]
