"""POST /classify: images -> k-NN vote of the chosen model."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from app.config import Settings
from app.deps import Decoder, get_decoder, get_registry, get_settings
from app.errors import ApiError, responses
from app.forms import FileField, read_form, request_body
from app.inference import batch_tensor, predict
from app.registry import Registry, ServedModel
from app.responses import json_response, to_predictions
from app.schemas import ClassifyResponse, ClassifyResult

router = APIRouter(tags=["classify"])
DEFAULT_TOP_K = 3


def resolve_top_k(model: ServedModel, top_k: int | None) -> int:
    """None -> min(3, classes); otherwise 1..classes or ApiError 422."""
    n = len(model.classes)
    if top_k is None:
        return min(DEFAULT_TOP_K, n)
    if not 1 <= top_k <= n:
        raise ApiError(422, "invalid_parameters", f"top_k must be in [1, {n}] for model {model.name!r}, got {top_k}")
    return top_k


class ClassifyForm(BaseModel):
    """The text fields of a /classify form (the images are the file parts `files` and `file`)."""

    model: str | None = Field(None, description="model name (GET /models); default: the default model")
    top_k: int | None = Field(None, ge=1, description="vote shares to return per image (default 3)")
    min_credibility: float | None = Field(None, ge=0, le=1, description="abstain below this conformal credibility "
                                          "(default: the server's SATML_MIN_CREDIBILITY)")


CLASSIFY_FILES = (FileField("files", "one or more images (PNG, JPEG, WebP, BMP, GIF)", many=True),
                  FileField("file", "a single image, instead of or besides `files`"))


@router.post("/classify", response_model=ClassifyResponse, responses=responses(400, 404, 413, 415, 503),
             openapi_extra=request_body(ClassifyForm, CLASSIFY_FILES))
async def classify(request: Request) -> Response:
    """Classify images by the k-nearest-neighbour vote of a model's embedding bank.

    Send the images as multipart field `files` (repeat it for several) or `file`. All images of
    one request go through the model as one batch. Each result has the predicted label and the
    top-k classes by share of the k neighbours' votes and, for calibrated models, the conformal
    credibility and confidence, with `abstained: true` below `min_credibility`. Images are squashed to the model's input
    size (bilinear); the format is read from the bytes, not the declared content type.
    """
    # the app state read directly, not through FastAPI's per-request dependency solving (~11 % of the event
    # loop's time at 1 image x 32 connections, issue 17's profile); the same getters, the same 503s
    registry = await get_registry(request)
    settings = await get_settings(request)
    decoder = await get_decoder(request, settings)
    async with read_form(request, ClassifyForm, CLASSIFY_FILES) as (uploads, form):
        return await _classify(registry, settings, decoder, uploads, form)


async def _classify(registry: Registry, settings: Settings, decoder: Decoder, uploads: list[UploadFile],
                    form: ClassifyForm) -> Response:
    t0 = time.perf_counter()
    served = registry.get(form.model or None)
    if not uploads:
        raise ApiError(422, "invalid_parameters", "no image: send one or more files in the multipart field 'files'")
    if len(uploads) > settings.max_files_per_request:
        raise ApiError(413, "too_many_files",
                       f"{len(uploads)} files in one request; the limit is {settings.max_files_per_request}")
    k = resolve_top_k(served, form.top_k)
    threshold = settings.min_credibility if form.min_credibility is None else form.min_credibility
    if form.min_credibility and served.artifact.calibration is None:
        raise ApiError(422, "invalid_parameters", f"model {served.name!r} has no calibration scores, so it cannot "
                                                  "abstain by credibility (satml calibrate adds them)")
    size = served.input_size
    images = await decoder.images(uploads, [size])
    x = batch_tensor([d.pixels[size] for _, d in images])
    pred, counts = await predict(served, x, settings.request_timeout_s)
    results = to_predictions(served, pred, counts, k, threshold, ClassifyResult, filename=[n for n, _ in images],
                             width=[d.width for _, d in images], height=[d.height for _, d in images])
    return json_response(ClassifyResponse(model=served.name, results=results,
                                          latency_ms=(time.perf_counter() - t0) * 1000))
