"""The app factory and its middleware: lifespan, request ids, JSON logs, errors, CORS, body limit."""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.logs import JsonFormatter
from app.main import create_app
from tests.app.conftest import make_settings
from tests.app.corpus import streamed_multipart
from tests.app.toy import png, toy_images

IMAGE = png(toy_images(1, 0)[0][0])


def test_factory_loads_nothing_until_started(good_root: Path) -> None:
    app = create_app(make_settings(good_root))
    assert not hasattr(app.state, "registry")
    with TestClient(app):
        assert set(app.state.registry.models) == {"default", "other"}
    assert all(m.worker._closed for m in app.state.registry.models.values())  # stopped at shutdown


def test_switch_interval_is_set_for_the_apps_lifetime_only(good_root: Path) -> None:
    before = sys.getswitchinterval()
    with TestClient(create_app(make_settings(good_root, switch_interval_ms=0.25))):
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    assert sys.getswitchinterval() == before
    with TestClient(create_app(make_settings(good_root))):  # unset: Python's own, untouched
        assert sys.getswitchinterval() == before


def test_startup_objects_are_frozen_out_of_the_collector_for_the_apps_lifetime(good_root: Path) -> None:
    """After start-up, a full collection scans only objects made since (gc.freeze): far faster than before, and
    nothing stays frozen after shutdown. With gc_freeze off the collector is untouched."""
    import gc
    import time

    def full_collection_s() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return time.perf_counter() - t0

    assert gc.get_freeze_count() == 0
    with TestClient(create_app(make_settings(good_root, gc_freeze=False))):
        assert gc.get_freeze_count() == 0
        unfrozen = min(full_collection_s() for _ in range(3))
    with TestClient(create_app(make_settings(good_root))):
        assert gc.get_freeze_count() > 100_000  # torch, faiss, the app, this test process
        frozen = min(full_collection_s() for _ in range(3))
    assert gc.get_freeze_count() == 0
    assert frozen < unfrozen / 5, (frozen, unfrozen)
    with TestClient(create_app(make_settings(good_root))):  # an app started inside another's lifetime
        outer = gc.get_freeze_count()  # frozen objects still die by reference count, so it only shrinks a little
        with TestClient(create_app(make_settings(good_root))):
            assert 0.9 * outer < gc.get_freeze_count() <= outer  # the inner app froze nothing more
        assert gc.get_freeze_count() > 0.9 * outer  # and its shutdown left the outer freeze alone
    assert gc.get_freeze_count() == 0


def test_request_id_echoed_or_generated(client: TestClient) -> None:
    assert client.get("/health/live", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = client.get("/health/live").headers["X-Request-ID"]
    assert len(generated) == 32
    hostile = client.get("/health/live", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"]
    assert hostile != "x" * 500
    assert client.get("/nope").headers["X-Request-ID"]  # errors carry it too


def test_access_log_is_structured(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    client.post("/classify", files={"file": ("a.png", IMAGE, "image/png")}, headers={"X-Request-ID": "req-1"})
    [record] = [r for r in caplog.records if r.name == "app.access" and r.fields["request_id"] == "req-1"]
    line = json.loads(JsonFormatter().format(record))
    assert line["method"] == "POST" and line["path"] == "/classify" and line["status"] == 200
    assert line["latency_ms"] > 0 and line["route"] == "/classify" and line["level"] == "info"


def test_unexpected_error_is_a_generic_500(good_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(make_settings(good_root))

    def boom() -> None:
        raise ZeroDivisionError("secret internals")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text and r.headers["X-Request-ID"] == "req-500"
    [record] = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "unhandled_error"]
    assert "ZeroDivisionError" in JsonFormatter().format(record)


def test_http_errors_are_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    r = client.get("/classify")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.post("/classify", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400, 422) and "error" in r.json()


def test_cors_closed_by_default(client: TestClient) -> None:
    r = client.options("/classify", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_configured(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, cors_origins=["http://ok.example"]))) as c:
        pre = {"Access-Control-Request-Method": "POST"}
        r = c.options("/classify", headers={"Origin": "http://ok.example", **pre})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = c.options("/classify", headers={"Origin": "http://evil.example", **pre})
        assert "access-control-allow-origin" not in r.headers


def test_body_limit_declared_and_streamed(good_root: Path) -> None:
    with TestClient(create_app(make_settings(good_root, max_upload_bytes=50_000))) as c:
        big = b"\0" * 60_000
        r = c.post("/classify", files={"file": ("a.png", big, "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = c.post("/classify", content=streamed_multipart(100_000, chunk=10_000),
                   headers={"Content-Type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = c.post("/classify", content=b"1", headers={"Content-Length": "abc"})
        assert r.status_code == 400
        assert c.post("/classify", files={"file": ("a.png", IMAGE, "image/png")}).status_code == 200


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_without_gpu_fails_at_startup(good_root: Path) -> None:
    with pytest.raises(RuntimeError, match="cuda"), TestClient(create_app(make_settings(good_root, device="cuda"))):
        pass


def test_fastapi_native_telemetry_is_off_unless_asked(good_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI >= 0.160 looks OpenTelemetry's global providers up on every request; off, it does not."""
    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        pytest.skip("this FastAPI has no native telemetry")
    from opentelemetry import trace

    calls = []
    real = trace.get_tracer_provider
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: calls.append(1) or real())
    for otel, want_calls in ((False, False), (True, True)):
        calls.clear()
        with TestClient(create_app(make_settings(good_root, otel=otel))) as c:
            assert c.get("/health/live").status_code == 200
        assert bool(calls) == want_calls, (otel, len(calls))
