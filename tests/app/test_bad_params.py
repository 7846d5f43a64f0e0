"""Issue 13, defect 9: `target` values that pass str.isdigit() but crash int() are 422, never 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])


@pytest.mark.parametrize("target", ["\u00b2", "\u0663", "1\u00b9", "9" * 5000, "-" + "1" * 5000, "+1", "1_0",
                                    " 3 ", "-1", "3", "99999999999999999999", "\u2460"])
def test_odd_targets_are_422(client: TestClient, target: str) -> None:
    r = client.post("/attack", files={"file": ("x.png", GOOD, "image/png")},
                    data={"target": target, "steps": "1"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameters" and len(r.json()["error"]["message"]) < 500


@pytest.mark.parametrize(("target", "label"), [("2", "blue"), (" 0 ", "red"), ("green", "green")])
def test_valid_targets_still_work(client: TestClient, target: str, label: str) -> None:
    r = client.post("/attack", files={"file": ("x.png", GOOD, "image/png")}, data={"target": target, "steps": "1"})
    assert r.status_code == 200, r.text
    assert r.json()["target"]["label"] == label


ODD_VALUES = [("top_k", "9" * 5000), ("top_k", "\u00b2"), ("top_k", "1e3"), ("model", "\x00" * 100),
              ("model", "m" * 100_000)]
ODD_ATTACK_VALUES = [("steps", "9" * 5000), ("steps", "-0"), ("steps", "\u00b2"), ("eps", "nan"), ("eps", "1e999"),
                     ("eps", "9" * 5000), ("method", "\x00"), ("compare", "\x00"), ("target", "\x00" * 10)]


@pytest.mark.parametrize(("route", "field", "value"), [("/classify", f, v) for f, v in ODD_VALUES]
                         + [("/attack", f, v) for f, v in ODD_VALUES + ODD_ATTACK_VALUES])
def test_odd_form_values_are_4xx(client: TestClient, route: str, field: str, value: str) -> None:
    name = "files" if route == "/classify" else "file"
    data = {"steps": "1"} if route == "/attack" else {}
    r = client.post(route, files={name: ("x.png", GOOD, "image/png")}, data={**data, field: value})
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error"} and len(r.json()["error"]["message"]) < 2000
