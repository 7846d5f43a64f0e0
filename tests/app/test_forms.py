"""app.forms: the hand-read /classify form keeps FastAPI's rules, errors and documentation."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.forms import BINARY
from tests.app.routes.test_classify import as_files
from tests.app.toy import png, toy_images

IMAGES = toy_images(1, seed=31)[0][:2]  # two of the three toy classes


def post(client: TestClient, **kw: Any) -> tuple[int, dict[str, Any]]:
    r = client.post("/classify", **kw)
    return r.status_code, r.json()


def test_empty_text_fields_count_as_absent(client: TestClient) -> None:
    status, body = post(client, files=as_files(IMAGES[:1]), data={"model": "", "top_k": "", "min_credibility": ""})
    assert status == 200, body
    assert body["model"] == "default" and len(body["results"][0]["votes"]) == 3  # the default model, default top_k


def test_a_repeated_text_field_keeps_its_last_value(client: TestClient) -> None:
    status, body = post(client, files=as_files(IMAGES[:1]), data={"top_k": ["1", "2"]})
    assert status == 200, body
    assert len(body["results"][0]["votes"]) == 2


def test_text_in_a_file_field_is_422_naming_it(client: TestClient) -> None:
    status, body = post(client, files=as_files(IMAGES[:1]), data={"file": "not a file"})
    assert status == 422 and body["error"]["code"] == "invalid_parameters"
    assert body["error"]["message"].startswith("file:"), body


def test_a_file_in_a_text_field_is_422_naming_it(client: TestClient) -> None:
    files = [*as_files(IMAGES[:1]), ("top_k", ("k.txt", b"2", "text/plain"))]
    status, body = post(client, files=files)
    assert status == 422 and body["error"]["message"].startswith("top_k:"), body


@pytest.mark.parametrize(("field", "value", "needle"), [("top_k", "0", "top_k: Input should be greater than or "
                                                         "equal to 1"),
                                                        ("min_credibility", "2", "min_credibility: Input should be "
                                                         "less than or equal to 1"),
                                                        ("top_k", "x", "top_k: Input should be a valid integer")])
def test_bad_text_values_are_pydantic_messages(client: TestClient, field: str, value: str, needle: str) -> None:
    status, body = post(client, files=as_files(IMAGES[:1]), data={field: value})
    assert status == 422 and needle in body["error"]["message"], body


def test_files_and_file_parts_keep_body_order_within_each_field(client: TestClient) -> None:
    files = [("file", ("single.png", png(IMAGES[1]), "image/png")), *as_files(IMAGES)]
    status, body = post(client, files=files)
    assert status == 200, body
    assert [r["filename"] for r in body["results"]] == ["img0.png", "img1.png", "single.png"]


def test_malformed_multipart_is_400(client: TestClient) -> None:
    r = client.post("/classify", content=b"--b\r\n", headers={"Content-Type": "multipart/form-data"})  # no boundary
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text


def test_the_uploads_are_closed_after_the_request(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.datastructures import UploadFile

    closed: list[str] = []
    original = UploadFile.close

    async def spy(self: UploadFile) -> None:
        closed.append(self.filename or "")
        await original(self)

    monkeypatch.setattr(UploadFile, "close", spy)
    assert post(client, files=as_files(IMAGES))[0] == 200
    assert post(client, files=as_files(IMAGES), data={"top_k": "0"})[0] == 422  # closed on the error path too
    assert sorted(closed) == ["img0.png", "img0.png", "img1.png", "img1.png"]


def test_the_openapi_body_documents_every_part(client: TestClient) -> None:
    body = client.get("/openapi.json").json()["paths"]["/classify"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    props = schema["properties"]
    assert list(props) == ["files", "file", "model", "top_k", "min_credibility"]
    assert props["files"]["anyOf"][0] == {"type": "array", "items": {"type": "string", **BINARY}}
    assert props["file"]["anyOf"][0] == {"type": "string", **BINARY} and props["file"]["contentMediaType"]
    assert props["top_k"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert props["min_credibility"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 1}
    assert "required" not in schema  # every part optional, as before; no image is a 422 of the route
