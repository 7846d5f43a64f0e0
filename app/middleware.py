"""Pure ASGI middleware: request id + access log + metrics + last-resort 500, and the body size limit."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from app.logs import fields
from app.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-ID"
# the method label of the metrics: one of these, else "other" (a raw label would let clients grow the series forever)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# on every response; the CSP by path: the demo page is same-origin only (its previews are data:/blob: images),
# the Swagger/ReDoc pages load their bundle from a CDN so they only forbid framing, everything else is data
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_CSP = "frame-ancestors 'none'"
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")


def content_security_policy(path: str) -> str:
    if path == "/" or path.startswith("/static/"):
        return PAGE_CSP
    return DOCS_CSP if path in DOCS_PATHS else API_CSP


access_log = logging.getLogger("app.access")
error_log = logging.getLogger("app.errors")


class RequestContextMiddleware:
    """Outermost: every request gets an id (echoed `X-Request-ID` or a new one), one JSON log line
    (method, path, status, latency, request id) and its metrics; an unexpected exception becomes a
    generic JSON 500 with the traceback in the log only."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, started, t0 = 500, False, time.perf_counter()
        method = scope["method"] if scope["method"] in METHODS else "other"

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("Content-Security-Policy", content_security_policy(scope["path"]))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when its graceful-shutdown timeout passes: answer
            # 503 + Retry-After (retry elsewhere) rather than let the server send a bare 500
            if not started:
                status = 503
                response = error_response(503, "shutting_down", "the server is shutting down; retry",
                                          headers={REQUEST_ID_HEADER: request_id, "Retry-After": "1",
                                                   "Connection": "close", **SECURITY_HEADERS,
                                                   "Content-Security-Policy": API_CSP})
                await response(scope, receive, send)
            raise
        except Exception:
            error_log.exception("unhandled error", extra=fields(event="unhandled_error", request_id=request_id,
                                                                method=scope["method"][:32],
                                                                path=scope["path"][:2048]))
            status = 500
            if not started:
                response = error_response(500, "internal_error",
                                          f"internal server error (request id {request_id})",
                                          headers={REQUEST_ID_HEADER: request_id, **SECURITY_HEADERS,
                                                   "Content-Security-Policy": API_CSP})
                await response(scope, receive, send)
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(seconds)
            access_log.info("request", extra=fields(
                event="request", request_id=request_id, method=scope["method"][:32], path=scope["path"][:2048],
                route=route, status=status, latency_ms=round(seconds * 1000, 3),
                client=(scope.get("client") or ("", 0))[0]))


class BodyLimitMiddleware:
    """413 JSON for a request body above `max_bytes`: at once from Content-Length, or once the
    streamed bytes pass the limit (whatever the inner app made of the cut-off body is discarded)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
        await error_response(413, "payload_too_large", message, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._reject(scope, receive, send)
                return
        received, exceeded, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the inner app's answer to a truncated body; ours replaces it below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._reject(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class InFlight:
    """POST requests in progress: counted by `AdmissionMiddleware` on the event loop, read by the batch workers
    (app.predictor: one intra-op thread for a small batch only while other requests need the loop's core). An
    int's read is atomic under the GIL; a stale read only picks the other thread count for one batch."""

    def __init__(self) -> None:
        self.active = 0

    def others(self) -> bool:
        """Whether another request than the one being computed is in progress."""
        return self.active > 1


class AdmissionMiddleware:
    """At most `max_requests` POST requests (the routes that decode and infer) in progress; more get 503
    with Retry-After at once, before their body is read. GETs (probes, metrics, pages) always pass."""

    def __init__(self, app: ASGIApp, max_requests: int, inflight: InFlight | None = None) -> None:
        self.app, self.max_requests = app, max_requests
        self.inflight = inflight or InFlight()  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        inflight = self.inflight
        if inflight.active >= self.max_requests:
            message = f"{inflight.active} requests in progress (limit {self.max_requests}); retry later"
            await error_response(503, "overloaded", message, headers={"Retry-After": "1"})(scope, receive, send)
            return
        inflight.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            inflight.active -= 1
