"""The bad-input corpus through HTTP: the right status and JSON error each time, and the server keeps serving."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.app.corpus import CORPUS
from tests.app.toy import png, toy_images

GOOD = png(toy_images(1, 3)[0][0])


def still_serving(c: TestClient) -> None:
    assert c.get("/health/live").status_code == 200
    r = c.post("/classify", files={"file": ("ok.png", GOOD, "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "red"


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("route", ["/classify", "/attack"])
def test_corpus(client: TestClient, route: str, name: str) -> None:
    make, content_type, expected, code = CORPUS[name]
    r = client.post(route, files={"file": (f"{name}.img", make(), content_type)}, data={"steps": "1"})
    assert r.status_code == expected, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code and name in r.json()["error"]["message"]
    still_serving(client)


def test_one_bad_file_fails_the_request_naming_it(client: TestClient) -> None:
    files = [("files", ("fine.png", GOOD, "image/png")), ("files", ("broken.png", b"\x89PNG\r\n\x1a\nxx", "image/png"))]
    r = client.post("/classify", files=files)
    assert r.status_code == 400 and "broken.png" in r.json()["error"]["message"]


def test_huge_multipart_body(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("big.png", b"\0" * (11 * 1024 * 1024), "image/png")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    still_serving(client)


def test_not_multipart_at_all(client: TestClient) -> None:
    for kw in ({"json": {"files": "x"}}, {"content": b"\xff" * 100, "headers": {"Content-Type": "image/png"}}):
        r = client.post("/classify", **kw)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameters"
    still_serving(client)
