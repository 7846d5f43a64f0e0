"""Issue 13, defect 10: /health/ready exposes no server paths or exception text; security headers everywhere,
a strict CSP on the demo page."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient


def test_ready_shows_no_server_paths(client: TestClient, mixed_root: Path) -> None:
    body = client.get("/health/ready").json()
    assert set(body["skipped"]) == {"bad_sha", "bad_version", "not_an_artifact"}
    for reason in body["skipped"].values():
        assert str(mixed_root) not in reason and str(mixed_root.resolve()) not in reason, reason
        assert not reason.startswith("/") and "/tmp" not in reason and "Traceback" not in reason
        assert len(reason) <= 300
    assert body["skipped"]["bad_sha"].startswith("bad_sha/") and "sha256 mismatch" in body["skipped"]["bad_sha"]


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics", "/models", "/nope", "/docs"])
def test_security_headers_on_every_response(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


def test_errors_carry_the_headers_too(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 415 and r.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]


@pytest.mark.parametrize("path", ["/", "/static/app.js"])
def test_demo_page_has_a_strict_csp(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["Content-Security-Policy"].split("; ")}
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"] and csp["object-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert "'unsafe-inline'" not in r.headers["Content-Security-Policy"]
    assert "'unsafe-eval'" not in r.headers["Content-Security-Policy"]
