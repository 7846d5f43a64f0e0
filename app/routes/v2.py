"""Open Inference Protocol v2 (KServe v2, the protocol Triton speaks) beside our own routes.

Same registry, decoder and batching worker as `/classify`, so a v2 client gets the same answers with
the same batching. Inputs (one per request):
  `images` FP32 [N, 3, H, W] in [0, 1] at the model's input size (H = W = manifest input.size), or
  `image_files` BYTES [N] holding encoded image files (PNG, JPEG, ...; base64 strings in the JSON
  encoding, raw bytes with the binary tensor extension), decoded and resized as `/classify` does.
Outputs: `label_id` INT64 [N], `label` BYTES [N] (class names), `vote_share` FP32 [N, C] (share of the
k neighbours' votes per class) and, for calibrated models, `credibility` FP32 [N] (conformal p-value).
Errors use the protocol's shape `{"error": "<message>"}`.

The JSON tensor encoding and Triton's binary tensor data extension (`Inference-Header-Content-Length`,
`binary_data_size`) are both accepted; outputs are returned as JSON unless the request asks for binary.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from app.deps import get_decoder
from app.errors import ApiError
from app.inference import predict
from app.registry import ServedModel
from app.responses import class_p_values
from app.routes import health

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT64": np.int64,
           "INT32": np.int32}


class V2Error(BaseModel):
    """The protocol's error body."""

    error: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "malformed request", 404: "unknown model or version", 413: "too many images or too large",
            415: "unsupported image type", 429: "queue full (Retry-After)", 503: "not ready or overloaded"}
    return {c: {"model": V2Error, "description": text[c]} for c in codes}


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _registry(request: Request) -> Any:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        raise ApiError(503, "not_ready", "the service is not started yet")
    return registry


def _model(request: Request, name: str) -> ServedModel:
    return _registry(request).get(name)


def _io_metadata(m: ServedModel) -> dict[str, Any]:
    s, c = m.input_size, len(m.classes)
    return {
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, s, s]},
                   {"name": "image_files", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "label_id", "datatype": "INT64", "shape": [-1]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "vote_share", "datatype": "FP32", "shape": [-1, c]},
                    *([{"name": "credibility", "datatype": "FP32", "shape": [-1]}]
                      if m.artifact.calibration is not None else [])],
    }


async def _guard(coro: Any) -> Any:
    """Run a handler body; our ApiError (404 unknown model, 413, 429, 503, ...) in the protocol's error shape."""
    try:
        return await coro
    except ApiError as e:
        return v2_error(e.status, e.message, e.headers)


@router.get("", summary="server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    from app.main import _version

    return {"name": "satml", "version": _version(), "extensions": EXTENSIONS}


@router.get("/health/live", summary="server live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="server ready", responses={503: {"description": "not ready"}})
async def server_ready(request: Request) -> Response:
    """Ready exactly when /health/ready is (the configured default serves, every batch worker healthy)."""
    ok = health.readiness(request.app)[1] is None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", summary="model metadata", responses=_errors(404, 503))
async def model_metadata(request: Request, name: str) -> Response:
    async def body() -> Response:
        m = _model(request, name)
        return JSONResponse({"name": m.name, "versions": ["1"], "platform": "pytorch_knn", **_io_metadata(m)})
    return await _guard(body())


@router.get("/models/{name}/versions/{version}", summary="model metadata (version)", responses=_errors(404, 503))
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    if version != "1":
        return v2_error(404, f"model {name!r} has no version {version!r} (only '1')")
    return await model_metadata(request, name)


@router.get("/models/{name}/ready", summary="model ready", responses=_errors(404, 503))
async def model_ready(request: Request, name: str) -> Response:
    async def body() -> Response:
        m = _model(request, name)
        settings = request.app.state.settings
        state = _registry(request).worker_states(settings.request_timeout_s).get(m.name, "missing")
        return JSONResponse({"name": m.name, "ready": state == "ok"}, status_code=200 if state == "ok" else 503)
    return await _guard(body())


def parse_request(raw: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """Body -> (JSON header, binary tail). With the binary extension the JSON header is the first
    `Inference-Header-Content-Length` bytes and the tensors follow it."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError as e:
            raise ApiError(400, "bad_request", f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}") from e
        if not 0 < n <= len(raw):
            raise ApiError(400, "bad_request", f"{HEADER_LENGTH} {n} is outside the body of {len(raw)} bytes")
        head, tail = raw[:n], raw[n:]
    else:
        head, tail = raw, b""
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_request", f"the inference request is not valid JSON: {e}") from e
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise ApiError(400, "bad_request", "the inference request needs a non-empty 'inputs' list")
    return req, tail


def _shape(inp: dict[str, Any]) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ApiError(400, "bad_request", f"input {inp.get('name')!r}: 'shape' must be a list of non-negative ints")
    return shape


def _split_binary(inputs: list[dict[str, Any]], tail: bytes) -> list[bytes | None]:
    """The binary blob of each input (None for JSON `data`), in order, checked against the body length."""
    blobs: list[bytes | None] = []
    offset = 0
    for inp in inputs:
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if size is None:
            blobs.append(None)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(tail):
            raise ApiError(400, "bad_request", f"input {inp.get('name')!r}: binary_data_size {size!r} does not fit "
                                               f"the {len(tail) - offset} bytes left in the body")
        blobs.append(tail[offset:offset + size])
        offset += size
    if offset != len(tail):
        raise ApiError(400, "bad_request", f"{len(tail) - offset} bytes after the last binary input")
    return blobs


def _bytes_elements(inp: dict[str, Any], blob: bytes | None) -> list[bytes]:
    """BYTES tensor -> files. Binary: each element is a 4-byte little-endian length and the bytes; JSON:
    each element a base64 string."""
    if blob is not None:
        out, i = [], 0
        while i < len(blob):
            if i + 4 > len(blob):
                raise ApiError(400, "bad_request", "truncated BYTES element length in the binary data")
            (n,) = struct.unpack_from("<I", blob, i)
            if i + 4 + n > len(blob):
                raise ApiError(400, "bad_request", "a BYTES element runs past the end of the binary data")
            out.append(blob[i + 4:i + 4 + n])
            i += 4 + n
        return out
    data = inp.get("data")
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise ApiError(400, "bad_request", "input 'image_files' (BYTES, JSON encoding) needs 'data': a list of "
                                           "base64 strings, one encoded image file each")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_request", f"input 'image_files': an element is not valid base64 ({e})") from e


def _tensor(inp: dict[str, Any], blob: bytes | None, size: int) -> torch.Tensor:
    """FP32 (or another numeric datatype) [N, 3, S, S] in [0, 1] -> float32 tensor; 400 on anything else."""
    shape = _shape(inp)
    dtype = _DTYPES.get(str(inp.get("datatype")))
    if dtype is None:
        raise ApiError(400, "bad_request", f"input 'images': datatype must be one of {sorted(_DTYPES)}")
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise ApiError(400, "bad_request", f"input 'images' must have shape [N, 3, {size}, {size}], got {shape}")
    count = int(np.prod(shape))
    try:
        if blob is not None:
            arr = np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<"))
        else:
            arr = np.asarray(inp.get("data"), dtype=dtype).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ApiError(400, "bad_request", f"input 'images': data is not a flat list of numbers ({e})") from e
    if arr.size != count:
        raise ApiError(400, "bad_request", f"input 'images': {arr.size} values for shape {shape} ({count} expected)")
    x = torch.from_numpy(arr.astype(np.float32).reshape(shape))
    if np.issubdtype(dtype, np.integer):
        x = x / 255.0  # UINT8-style pixels
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ApiError(400, "bad_request", "input 'images' must hold finite values in [0, 1] (or 0..255 integers)")
    return x


def _outputs(m: ServedModel, pred: torch.Tensor, counts: torch.Tensor,
             wanted: list[str] | None) -> list[dict[str, Any]]:
    n = len(pred)
    shares = counts.float() / counts.sum(1, keepdim=True).clamp_min(1)
    every = {
        "label_id": {"datatype": "INT64", "shape": [n], "data": [int(p) for p in pred]},
        "label": {"datatype": "BYTES", "shape": [n], "data": [m.classes[int(p)] for p in pred]},
        "vote_share": {"datatype": "FP32", "shape": [n, shares.shape[1]],
                       "data": [float(v) for v in shares.reshape(-1)]},
    }
    if m.p_table is not None:  # the same p-values as /classify's credibility (app.responses)
        cred = []
        for row, p in zip(counts.tolist(), pred.tolist(), strict=True):
            pv = class_p_values(m, row)
            cred.append(pv[p] if pv is not None else float("nan"))
        every["credibility"] = {"datatype": "FP32", "shape": [n], "data": cred}
    names = wanted or list(every)
    unknown = [o for o in names if o not in every]
    if unknown:
        raise ApiError(400, "bad_request", f"unknown output {unknown[0]!r}; outputs are {list(every)}")
    return [{"name": o, **every[o]} for o in names]


@router.post("/models/{name}/infer", summary="inference", responses=_errors(400, 404, 413, 415, 429, 503))
async def infer(request: Request, name: str) -> Response:
    return await _guard(_infer(request, name))


@router.post("/models/{name}/versions/{version}/infer", summary="inference (version)",
             responses=_errors(400, 404, 413, 415, 429, 503))
async def infer_version(request: Request, name: str, version: str) -> Response:
    if version != "1":
        return v2_error(404, f"model {name!r} has no version {version!r} (only '1')")
    return await infer(request, name)


async def _infer(request: Request, name: str) -> Response:
    m = _model(request, name)
    settings = request.app.state.settings
    req, tail = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
    inputs = req["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, "bad_request", "send exactly one input: 'images' (FP32 [N,3,H,W]) or 'image_files' "
                                           "(BYTES [N])")
    inp = inputs[0]
    (blob,) = _split_binary(inputs, tail)
    if inp.get("name") == "image_files" or inp.get("datatype") == "BYTES":
        if inp.get("datatype") != "BYTES":
            raise ApiError(400, "bad_request", "input 'image_files' must have datatype BYTES")
        files = _bytes_elements(inp, blob)
        shape = _shape(inp)
        if int(np.prod(shape)) != len(files):
            raise ApiError(400, "bad_request", f"input 'image_files': {len(files)} elements for shape {shape}")
        if not files:
            raise ApiError(400, "bad_request", "input 'image_files' holds no image")
        if len(files) > settings.max_files_per_request:
            raise ApiError(413, "too_many_files", f"{len(files)} images in one request; the limit is "
                                                  f"{settings.max_files_per_request}")
        decoded = await (await get_decoder(request, settings)).decode_named(
            [(f"image_files[{i}]", f) for i, f in enumerate(files)], [m.input_size])
        x = torch.from_numpy(np.stack([d.pixels[m.input_size] for _, d in decoded])).permute(0, 3, 1, 2)
        x = x.float().div_(255)
    elif inp.get("name") == "images":
        x = _tensor(inp, blob, m.input_size)
        if len(x) == 0:
            raise ApiError(400, "bad_request", "input 'images' holds no image")
        if len(x) > settings.max_files_per_request:
            raise ApiError(413, "too_many_files", f"{len(x)} images in one request; the limit is "
                                                  f"{settings.max_files_per_request}")
    else:
        raise ApiError(400, "bad_request", f"unknown input {inp.get('name')!r}; inputs are 'images' and 'image_files'")
    requested = req.get("outputs")
    wanted = None
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                      for o in requested):
            raise ApiError(400, "bad_request", "'outputs' must be a list of {\"name\": ...} objects")
        wanted = [o["name"] for o in requested]
    pred, counts = await predict(m, x, settings.request_timeout_s)
    body: dict[str, Any] = {"model_name": m.name, "model_version": "1", "outputs": _outputs(m, pred, counts, wanted)}
    if isinstance(req.get("id"), str):
        body["id"] = req["id"]
    return JSONResponse(body)
