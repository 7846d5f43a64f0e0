"""`Annotated` dependencies: everything a route needs comes from `app.state`, set by the lifespan.

All are `async def`: FastAPI runs a plain `def` dependency on its thread pool, one thread hop (and a
wait for the GIL) per dependency per request, for what is an attribute lookup (issue 17's profile)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable, Sequence
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.attack import AttackService
from app.config import Settings
from app.errors import ApiError
from app.images import Decoded, decode_for_model, decode_opened, open_image
from app.metrics import Metrics
from app.registry import Registry


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_registry(request: Request) -> Registry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        raise ApiError(503, "not_ready", "models are not loaded yet")
    return registry


async def get_attacks(request: Request) -> AttackService:
    attacks = getattr(request.app.state, "attacks", None)
    if attacks is None:
        raise ApiError(503, "not_ready", "the attack service is not running")
    return attacks


# a request this small is decoded on the event loop: a few thumbnails decode and resize in well under a
# millisecond, less than the thread hop (~0.6 ms under load, issue 17's profile) that offloading costs
INLINE_MAX_FILES, INLINE_MAX_BYTES, INLINE_MAX_PIXELS = 8, 256 * 1024, 128 * 128


class Decoder:
    """Decodes uploads off the event loop, at most `slots` at once, each shrunk to the model input
    sizes in the worker thread (only the small arrays are kept: memory is bounded by `slots` full
    images, whatever the request holds). A request whose images add up to more than
    `max_request_pixels` (read from the headers) is refused with 413 before any pixel is decoded.
    Tiny requests (INLINE_*: thumbnails such as 32x32 CIFAR images) are decoded on the loop itself."""

    def __init__(self, settings: Settings, slots: asyncio.Semaphore) -> None:
        self.max_pixels, self.max_request_pixels, self.slots = settings.max_pixels, settings.max_request_pixels, slots
        self.wait_s = settings.decode_wait_s

    def _check_budget(self, named: list[tuple[str, bytes]]) -> list[Image.Image]:
        """Each image opened (header only, nothing decoded); ApiError 400/413/415 per file, 413 when their pixels
        (width x height) add up to more than the request budget."""
        opened = [open_image(data, self.max_pixels, name) for name, data in named]
        total = sum(im.size[0] * im.size[1] for im in opened)
        if total > self.max_request_pixels:
            raise ApiError(413, "request_too_large",
                           f"the {len(named)} images of this request have {total} pixels in all (width x height); "
                           f"the limit per request is {self.max_request_pixels}: send fewer or smaller images")
        return opened

    def _decode_one(self, named: list[tuple[str, bytes]], i: int, sizes: tuple[int, ...],
                    check: bool) -> Decoded:
        """In a worker thread: image i, shrunk at once; with `check`, first the request's budget (headers only)."""
        if check:
            self._check_budget(named)
        name, data = named[i]
        return decode_for_model(data, self.max_pixels, sizes, name)

    async def _decode(self, named: list[tuple[str, bytes]], i: int, sizes: tuple[int, ...], check: bool) -> Decoded:
        """One image in a worker thread, once a slot is free (waited for on the event loop, with a deadline)."""
        try:
            await asyncio.wait_for(self.slots.acquire(), self.wait_s)
        except TimeoutError as e:
            raise ApiError(503, "overloaded", f"all image decoders stayed busy for {self.wait_s:g} s; retry later",
                           headers={"Retry-After": "1"}) from e
        try:  # run_in_threadpool is not abandoned on cancellation: the slot is held until the thread is done
            return await run_in_threadpool(self._decode_one, named, i, sizes, check)
        finally:
            self.slots.release()

    async def images(self, uploads: Sequence[UploadFile], sizes: Iterable[int]) -> list[tuple[str, Decoded]]:
        """(filename, Decoded at each of `sizes`) per upload, in order; ApiError 400/413/415 on the first bad one,
        503 + Retry-After when no decoder frees up within `decode_wait_s`."""
        named = [(upload.filename or f"file{i}", await upload.read()) for i, upload in enumerate(uploads)]
        return await self.decode_named(named, sizes)

    async def decode_named(self, named: list[tuple[str, bytes]], sizes: Iterable[int]) -> list[tuple[str, Decoded]]:
        """Like `images`, for files already in memory as (name, bytes): the Open Inference Protocol's BYTES
        tensors take the same budget check, decode slots and shrink-in-the-worker path as multipart uploads.
        One thread hop per image, the budget check riding with the first (a one-image request crosses threads
        once); between images the event loop gets the GIL back. Tiny requests never leave the loop."""
        wanted = tuple(sorted(set(sizes)))
        if len(named) <= INLINE_MAX_FILES and sum(len(data) for _, data in named) <= INLINE_MAX_BYTES:
            opened = self._check_budget(named)  # headers of a few small files: microseconds
            if max(im.size[0] * im.size[1] for im in opened) <= INLINE_MAX_PIXELS:  # decoded as opened, on the loop
                return [(name, decode_opened(im, wanted, name)) for (name, _), im in zip(named, opened, strict=True)]
            return [(name, await self._decode(named, i, wanted, check=False)) for i, (name, _) in enumerate(named)]
        return [(name, await self._decode(named, i, wanted, check=i == 0)) for i, (name, _) in enumerate(named)]


async def get_decoder(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> Decoder:
    slots = getattr(request.app.state, "decode_slots", None)
    if slots is None:
        raise ApiError(503, "not_ready", "the service is not started yet")
    return Decoder(settings, slots)


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required for /attack when the server has an API key configured")


async def require_api_key(settings: Annotated[Settings, Depends(get_settings)],
                    key: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """401 unless no key is configured or the header matches it (constant-time comparison)."""
    if settings.api_key is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), settings.api_key.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
AttacksDep = Annotated[AttackService, Depends(get_attacks)]
DecoderDep = Annotated[Decoder, Depends(get_decoder)]
