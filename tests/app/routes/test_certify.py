"""POST /certify: smoothed prediction and radius through the served model, bounds, API key, queue limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import png, toy_images

RED = toy_images(1, seed=31)[0][0]
FAST = {"n": 200, "n0": 20, "sigma": 0.12, "alpha": 0.01}


def post(c: TestClient, image: np.ndarray = RED, **data: object) -> httpx.Response:
    return c.post("/certify", files={"file": ("x.png", png(image), "image/png")},
                  data={k: str(v) for k, v in data.items()})


def test_certifies_a_clear_image(client: TestClient) -> None:
    r = post(client, **FAST)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "default" and body["label"] == "red" and body["class_id"] == 0
    assert body["abstained"] is False and body["radius"] > 0 and 0.5 < body["p_lower"] < 1
    assert body["count"] <= 200 and (body["n"], body["n0"], body["sigma"], body["alpha"]) == (200, 20, 0.12, 0.01)
    assert body["latency_ms"] > 0
    again = post(client, **FAST).json()  # seeded: the same request gives the same certificate
    assert (again["radius"], again["count"]) == (body["radius"], body["count"])
    metrics = client.get("/metrics").text
    assert 'satml_certifications_total{model="default",outcome="certified"} 2.0' in metrics


def test_radius_grows_with_n_and_sigma_bounds_it(client: TestClient) -> None:
    small = post(client, **{**FAST, "n": 50}).json()
    large = post(client, **{**FAST, "n": 400}).json()
    # a clear image: every noisy copy votes red, so the bound is alpha^(1/n) and the radius grows with n
    assert small["count"] == 50 and large["count"] == 400 and small["radius"] < large["radius"]
    assert large["p_lower"] == pytest.approx(0.01 ** (1 / 400))


def test_not_significant_abstains(client: TestClient) -> None:
    # n = 5 unanimous votes bound pA below by 0.01 ** (1 / 5) = 0.40 <= 1/2 at alpha 0.01: no certificate
    body = post(client, n=5, n0=5, sigma=0.12, alpha=0.01).json()
    assert body["abstained"] is True and body["label"] is None and body["class_id"] is None
    assert body["radius"] == 0.0 and body["count"] == 5 and body["p_lower"] == pytest.approx(0.01 ** (1 / 5))
    # n = 7: 0.01 ** (1 / 7) = 0.52 > 1/2, the smallest n that certifies at this alpha
    seven = post(client, n=7, n0=5, sigma=0.12, alpha=0.01).json()
    assert seven["abstained"] is False and seven["label"] == "red" and seven["radius"] > 0
    assert 'outcome="abstained"' in client.get("/metrics").text


def test_other_model_and_unknown_model(client: TestClient) -> None:
    assert post(client, model="other", **FAST).json()["model"] == "other"
    r = post(client, model="nope", **FAST)
    assert r.status_code == 404 and r.json()["error"]["code"]


@pytest.mark.parametrize("data", [{"sigma": 0}, {"sigma": -0.1}, {"sigma": "nan"}, {"sigma": 1.5},
                                  {"n": 0}, {"n": 10_001}, {"n0": 0}, {"n0": 1_001},
                                  {"alpha": 0}, {"alpha": 0.5}, {"alpha": 2}, {"n": "many"}])
def test_bad_parameters_are_422(client: TestClient, data: dict[str, object]) -> None:
    r = post(client, **{**FAST, **data})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameters"


def test_bad_images(client: TestClient) -> None:
    r = client.post("/certify", files={"file": ("x.png", b"not an image", "image/png")}, data=FAST)
    assert r.status_code in (400, 415) and "error" in r.json()
    assert client.post("/certify", data=FAST).status_code == 422  # no file


def test_settings_bound_the_parameters(good_root: Path) -> None:
    settings = make_settings(good_root, certify_max_n=100, certify_max_n0=10, certify_max_sigma=0.5)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert post(c, n=101, n0=10, sigma=0.5).status_code == 422
        assert post(c, n=100, n0=11, sigma=0.5).status_code == 422
        r = post(c, n=100, n0=10, sigma=0.51)
        assert r.status_code == 422 and "0.5" in r.json()["error"]["message"]
        assert post(c, n=100, n0=10, sigma=0.5).status_code == 200


def test_certify_chunk_bounds_the_batches_it_sends(good_root: Path) -> None:
    """The noisy copies reach the worker in chunks of certify_chunk (a /classify arriving mid-chunk waits at most
    one chunk), never above max_batch: 20 + 200 copies in chunks of 8 are 3 + 25 batches of <= 8 images."""
    with TestClient(create_app(make_settings(good_root, certify_chunk=8))) as c:
        assert post(c, **FAST).status_code == 200
        text = c.get("/metrics").text
    assert 'satml_inference_batch_size_count{model="default"} 28.0' in text
    assert 'satml_inference_batch_size_sum{model="default"} 220.0' in text
    assert 'satml_inference_batch_size_bucket{le="8.0",model="default"} 28.0' in text
    assert 'satml_inference_batch_size_bucket{le="4.0",model="default"} 1.0' in text  # 20 = 8 + 8 + 4
    for chunk in (4096, None):  # larger than max_batch, or unset: max_batch
        with TestClient(create_app(make_settings(good_root, certify_chunk=chunk, max_batch=64))) as c:
            assert post(c, **FAST).status_code == 200
            text = c.get("/metrics").text
        assert 'satml_inference_batch_size_count{model="default"} 5.0' in text  # 20, then 64 + 64 + 64 + 8
    with TestClient(create_app(make_settings(good_root, max_batch=64))) as c:  # the default: chunks of 32
        assert post(c, **FAST).status_code == 200
        text = c.get("/metrics").text
    assert 'satml_inference_batch_size_count{model="default"} 8.0' in text  # 20, then 6 x 32 + 8
    assert 'satml_inference_batch_size_bucket{le="32.0",model="default"} 8.0' in text


def test_api_key_guards_it(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, api_key="s3cret")), raise_server_exceptions=False) as c:
        assert post(c, **FAST).status_code == 401
        ok = c.post("/certify", files={"file": ("x.png", png(RED), "image/png")},
                    data={k: str(v) for k, v in FAST.items()}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200


def test_deadline_is_504(good_root: Path) -> None:
    settings = make_settings(good_root, certify_timeout_s=0.05)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = post(c, n=10_000, n0=1_000, sigma=0.25)
        assert r.status_code == 504 and r.json()["error"]["code"] == "certify_timeout"
        assert 'outcome="timeout"' in c.get("/metrics").text
        assert post(c, **{**FAST, "n": 10, "n0": 1}).status_code in (200, 504)  # the pool still serves


def test_full_queue_is_429_before_decoding(good_root: Path) -> None:
    app = create_app(make_settings(good_root, certify_concurrency=1, certify_queue=0))

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            slot = app.state.certifier.admit()  # the only place, held
            try:
                r = await c.post("/certify", files={"file": ("x.png", b"not even an image", "image/png")},
                                 data={k: str(v) for k, v in FAST.items()})
            finally:
                slot.release()
            ok = await c.post("/certify", files={"file": ("x.png", png(RED), "image/png")},
                              data={k: str(v) for k, v in FAST.items()})
            assert r.headers.get("Retry-After") and r.json()["error"]["code"] == "certify_queue_full"
            return [r.status_code, ok.status_code]

    assert asyncio.run(scenario()) == [429, 200]


def test_attack_pool_is_separate(client: TestClient) -> None:
    app = client.app
    assert app.state.certifier is not app.state.attacks  # type: ignore[attr-defined]
    assert app.state.certifier.kind == "certify" and app.state.attacks.kind == "attack"  # type: ignore[attr-defined]
