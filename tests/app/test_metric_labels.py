"""Issue 13, defect 3: the HTTP method label of the metrics is one of a fixed set, whatever clients send."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.middleware import METHODS


def test_made_up_methods_do_not_grow_the_metrics(client: TestClient) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/metrics").status_code == 200  # its own series exist from now on
    for i in range(50):
        r = client.request(f"BOGUS{i}", "/health/live")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    text = client.get("/metrics").text
    assert "BOGUS" not in text
    methods = set(re.findall(r'method="([^"]*)"', text))
    assert methods <= set(METHODS) | {"other"} and "other" in methods and "GET" in methods
    # 50 requests with 50 different methods made one series, not 50
    series = [line for line in text.splitlines()
              if line.startswith("satml_http_requests_total{") and 'method="other"' in line]
    assert len(series) == 1 and line_value(series[0]) >= 50
    for i in range(50, 100):  # 50 more made-up methods: not one more line in /metrics
        client.request(f"BOGUS{i}", "/health/live")
    after = client.get("/metrics").text
    assert len(after.splitlines()) == len(text.splitlines()) and "BOGUS" not in after


def line_value(line: str) -> float:
    return float(line.rsplit(" ", 1)[1])
