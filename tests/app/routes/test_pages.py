"""GET /: the demo page when installed, else a minimal page that links the API docs."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.routes import pages


def test_fallback_page(client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pages, "STATIC_DIR", tmp_path)
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and 'href="/docs"' in r.text


def test_demo_page_served(client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>demo</title>")
    monkeypatch.setattr(pages, "STATIC_DIR", tmp_path)
    r = client.get("/")
    assert r.status_code == 200 and "<title>demo</title>" in r.text


def test_docs_and_openapi(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/classify", "/attack", "/models", "/models/{name}", "/health/live", "/health/ready", "/metrics"} <= set(
        spec["paths"])
    assert "Classify images" in spec["paths"]["/classify"]["post"]["description"] or \
        "Classify images" in spec["paths"]["/classify"]["post"]["summary"]
