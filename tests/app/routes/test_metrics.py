"""GET /metrics: Prometheus text with requests, latency, batch sizes, queue depth; one registry per app."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.toy import png, toy_images


def test_exposition(client: TestClient) -> None:
    client.post("/classify", files={"file": ("a.png", png(toy_images(1, 0)[0][0]), "image/png")})
    client.get("/models/nope")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'satml_http_requests_total{method="POST",route="/classify",status="200"} 1.0' in text
    assert 'satml_http_requests_total{method="GET",route="/models/{name}",status="404"} 1.0' in text
    assert 'satml_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/classify"}' in text
    assert 'satml_inference_batch_size_count{model="default"} 1.0' in text
    assert 'satml_inference_queue_depth{model="default"} 0.0' in text
    assert "satml_attack_queue_depth 0.0" in text and "satml_models_loaded 2.0" in text
    assert "satml_models_skipped 3.0" in text


def test_each_app_has_its_own_registry(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root))) as a, TestClient(create_app(make_settings(good_root))) as b:
        a.get("/health/live")
        assert 'route="/health/live"' in a.get("/metrics").text
        assert 'route="/health/live"' not in b.get("/metrics").text
