"""Open Inference Protocol v2: the official Triton HTTP client against a real uvicorn on 127.0.0.1, the
protocol's JSON examples through the app, and the same answers as /classify."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.app.servers import wait_ready
from tests.app.test_serve import free_port
from tests.app.toy import SIZE, png, toy_images

tritonhttp = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def server(good_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("v2") / "server.log").open("w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SATML_")}
    proc = subprocess.Popen([sys.executable, "-m", "app.serve", "--port", str(port), "--artifacts-dir", str(good_root)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(lambda: proc.poll() is None, f"http://127.0.0.1:{port}/v2/health/ready", poll_s=0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return toy_images(4, seed=5)  # uint8 [12, S, S, 3], labels [12]


def _classify(url: str, pixels: np.ndarray) -> list[int]:
    files = [("files", (f"{i}.png", png(p), "image/png")) for i, p in enumerate(pixels)]
    r = httpx.post(f"http://{url}/classify", files=files, timeout=30)
    assert r.status_code == 200, r.text
    return [res["class_id"] for res in r.json()["results"]]


def test_official_client_health_and_metadata(server: str) -> None:
    client = tritonhttp.InferenceServerClient(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("default")
    meta = client.get_server_metadata()
    assert meta["name"] == "satml" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("default")
    assert model["name"] == "default" and model["versions"] == ["1"]
    assert {i["name"]: i["shape"] for i in model["inputs"]} == {"images": [-1, 3, SIZE, SIZE], "image_files": [-1]}
    assert {o["name"] for o in model["outputs"]} == {"label_id", "label", "vote_share"}
    with pytest.raises(tritonhttp.InferenceServerException, match="unknown model"):
        client.get_model_metadata("no_such_model")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_official_client_infer_tensor_equals_classify(server: str, images: tuple[np.ndarray, np.ndarray],
                                                      binary: bool) -> None:
    pixels, labels = images
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255
    client = tritonhttp.InferenceServerClient(server)
    inp = tritonhttp.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [tritonhttp.InferRequestedOutput(n, binary_data=False) for n in ("label_id", "label", "vote_share")]
    result = client.infer("default", [inp], outputs=outputs, request_id="req-7")
    ids = result.as_numpy("label_id")
    shares = result.as_numpy("vote_share")
    assert ids.dtype == np.int64 and ids.shape == (len(x),)
    assert shares.shape == (len(x), 3) and np.allclose(shares.sum(1), 1.0)
    assert (shares.argmax(1) == ids).all()
    classes = httpx.get(f"http://{server}/models/default", timeout=10).json()["classes"]
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label")]
    assert names == [classes[i] for i in ids]
    assert result.get_response()["id"] == "req-7"
    # same pixels through /classify (PNG, lossless, already at the model's size): the same answers
    assert ids.tolist() == _classify(server, pixels)
    assert (ids == labels).mean() >= 0.9  # the toy model solves its toy problem


def test_official_client_infer_image_files(server: str, images: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, _ = images
    files = np.array([png(p) for p in pixels], dtype=np.object_)
    client = tritonhttp.InferenceServerClient(server)
    inp = tritonhttp.InferInput("image_files", [len(files)], "BYTES")
    inp.set_data_from_numpy(files, binary_data=True)
    result = client.infer("default", [inp], outputs=[tritonhttp.InferRequestedOutput("label_id", binary_data=False)])
    assert result.as_numpy("label_id").tolist() == _classify(server, pixels)


def test_official_client_sees_protocol_errors(server: str) -> None:
    client = tritonhttp.InferenceServerClient(server)
    bad = tritonhttp.InferInput("images", [1, 3, SIZE + 1, SIZE + 1], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, SIZE + 1, SIZE + 1), np.float32), binary_data=False)
    with pytest.raises(tritonhttp.InferenceServerException, match=r"shape \[N, 3"):
        client.infer("default", [bad])


# --- the protocol's JSON encoding, message by message (through the app, no client library) -------------------


def _post(client: TestClient, body: object, model: str = "default", **kw) -> httpx.Response:
    return client.post(f"/v2/models/{model}/infer", content=json.dumps(body).encode(), **kw)


def test_json_example_request_and_response_shape(client: TestClient, images: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, _ = images
    x = pixels[:2].transpose(0, 3, 1, 2).astype(np.float32) / 255
    body = {"id": "42", "inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.reshape(-1).tolist()}],
            "outputs": [{"name": "label_id"}, {"name": "vote_share"}]}
    r = _post(client, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "default" and out["id"] == "42" and out["model_version"] == "1"
    assert [o["name"] for o in out["outputs"]] == ["label_id", "vote_share"]
    ids, shares = out["outputs"]
    assert ids["datatype"] == "INT64" and ids["shape"] == [2] and len(ids["data"]) == 2
    assert shares["datatype"] == "FP32" and shares["shape"] == [2, 3] and len(shares["data"]) == 6
    # UINT8 pixels (0..255) are the same images
    u8 = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8",
                      "data": pixels[:2].transpose(0, 3, 1, 2).reshape(-1).tolist()}]}
    assert _post(client, u8).json()["outputs"][0]["data"] == ids["data"]
    b64 = {"inputs": [{"name": "image_files", "shape": [2], "datatype": "BYTES",
                       "data": [base64.b64encode(png(p)).decode() for p in pixels[:2]]}]}
    assert _post(client, b64).json()["outputs"][0]["data"] == ids["data"]


@pytest.mark.parametrize(("body", "status", "match"), [
    ("not json", 400, "not valid JSON"),
    ({"inputs": []}, 400, "non-empty 'inputs'"),
    ({"inputs": [{"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32", "data": [0.5]}]}, 400,
     "values for shape"),
    ({"inputs": [{"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32",
                  "data": [2.0] * (3 * SIZE * SIZE)}]}, 400, r"in \[0, 1\]"),
    ({"inputs": [{"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32",
                  "data": ["x"] * (3 * SIZE * SIZE)}]}, 400, "numbers"),
    ({"inputs": [{"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "BF99", "data": []}]}, 400, "datatype"),
    ({"inputs": [{"name": "images", "shape": "1x3", "datatype": "FP32", "data": []}]}, 400, "shape"),
    ({"inputs": [{"name": "image_files", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, 400, "base64"),
    ({"inputs": [{"name": "image_files", "shape": [1], "datatype": "BYTES",
                  "data": [base64.b64encode(b"not an image").decode()]}]}, 415, ""),
    ({"inputs": [{"name": "other", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400, "unknown input"),
    ({"inputs": [{"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32",
                  "data": [0.5] * (3 * SIZE * SIZE)}], "outputs": [{"name": "logits"}]}, 400, "unknown output"),
])
def test_bad_requests_get_protocol_errors(client: TestClient, body: object, status: int, match: str) -> None:
    r = client.post("/v2/models/default/infer",
                    content=body.encode() if isinstance(body, str) else json.dumps(body).encode())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err, str) and (not match or re.search(match, err)), err


def test_unknown_model_and_version(client: TestClient) -> None:
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/default/versions/2"):
        r = client.get(path)
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
    assert client.get("/v2/models/default/versions/1").json()["name"] == "default"
    r = _post(client, {"inputs": [{"name": "images", "shape": [0, 3, SIZE, SIZE], "datatype": "FP32", "data": []}]},
              model="nope")
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


def test_binary_extension_lengths_are_checked(client: TestClient) -> None:
    head = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 3 * SIZE * SIZE * 4}}]}).encode()
    blob = np.full(3 * SIZE * SIZE, 0.5, np.float32).tobytes()
    ok = client.post("/v2/models/default/infer", content=head + blob,
                     headers={"Inference-Header-Content-Length": str(len(head))})
    assert ok.status_code == 200, ok.text
    short = client.post("/v2/models/default/infer", content=head + blob[:-4],
                        headers={"Inference-Header-Content-Length": str(len(head))})
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
    extra = client.post("/v2/models/default/infer", content=head + blob + b"xx",
                        headers={"Inference-Header-Content-Length": str(len(head))})
    assert extra.status_code == 400 and "after the last" in extra.json()["error"]
    bad = client.post("/v2/models/default/infer", content=head + blob, headers={"Inference-Header-Content-Length": "x"})
    assert bad.status_code == 400
