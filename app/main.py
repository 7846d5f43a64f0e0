"""The app factory: `create_app(settings)` builds a FastAPI app whose lifespan owns every heavy resource.

Nothing is loaded at import time. At start-up the lifespan loads every artifact folder (verified
sha256 + format version; a bad one is logged and skipped), starts one batching worker per model
and the attack pool, and keeps them on `app.state` (the only store); at shutdown it stops them.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app.attack import AttackService
from app.config import Settings
from app.errors import install_error_handlers
from app.logs import fields
from app.metrics import Metrics
from app.middleware import (
    REQUEST_ID_HEADER,
    AdmissionMiddleware,
    BodyLimitMiddleware,
    InFlight,
    RequestContextMiddleware,
)
from app.registry import load_registry
from app.routes import ROUTERS
from app.routes.pages import STATIC_DIR

log = logging.getLogger("app.main")

DESCRIPTION = """Robust image classification: a self-supervised, adversarially trained (SAT) encoder
classifies by k-nearest-neighbour vote over an embedding bank. `POST /classify` labels images,
`POST /attack` crafts adversarial examples live and compares models. Errors are JSON
`{"error": {"code", "message"}}`."""


def _version() -> str:
    try:
        return version("robust-ssl-service")
    except PackageNotFoundError:
        return "0.0.0"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for 0.0.0.0, :: and anything else."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def telemetry_options(enabled: bool) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry (FastAPI >= 0.160 has it): off unless `SATML_OTEL`, because even with no
    provider configured it looks the global providers up on every request (~4 % of the event loop's samples
    under load, py-spy); /metrics (Prometheus) is the service's own telemetry. Older FastAPI: nothing to pass."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {} if enabled else {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def end_this_process(model: str) -> None:
    """With several server processes (`SATML_WORKERS` > 1): a process whose batch worker died can no longer serve
    that model, and a readiness probe reaching it would fail while the others pass. It ends (SIGTERM: uvicorn
    finishes the requests in flight) and uvicorn's supervisor starts a fresh process in its place; the others keep
    serving. With one process, readiness fails instead (the orchestrator restarts the server)."""
    log.critical("batch worker died: ending this server process for the supervisor to replace",
                 extra=fields(event="process_ending", model=model, pid=os.getpid()))
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app for `settings` (default: from `SATML_*` environment variables)."""
    settings = settings or Settings()
    metrics = Metrics()
    inflight = InFlight()  # the admission middleware counts, the batch workers read (thread count per batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # created on the serving loop (asyncio primitives bind to the loop they first wait on)
        app.state.decode_slots = asyncio.Semaphore(settings.decode_slots or max(2, os.cpu_count() or 2))
        threads = settings.threads_per_process()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        switch_interval = sys.getswitchinterval()  # restored at shutdown: the setting lives with the app
        if settings.switch_interval_ms is not None:
            sys.setswitchinterval(settings.switch_interval_ms / 1000)
        # one of several processes: a dead batch worker ends this process, and uvicorn's supervisor starts a new one
        on_death = end_this_process if settings.processes() > 1 else None
        registry = await run_in_threadpool(load_registry, settings, metrics, inflight.others, on_death)
        # only when nothing is frozen yet: an app started inside another's lifetime (tests) leaves the outer one's
        # freeze alone, and does not unfreeze it at its own shutdown
        froze = settings.gc_freeze and gc.get_freeze_count() == 0
        if froze:
            gc.collect()  # what is garbage now is freed, not frozen
            gc.freeze()
        attacks = AttackService(settings.attack_concurrency, settings.attack_queue, settings.attack_timeout_s,
                                metrics)
        certifier = AttackService(settings.certify_concurrency, settings.certify_queue, settings.certify_timeout_s,
                                  metrics, kind="certify", depth=metrics.certify_queue_depth)  # POST /certify
        app.state.registry, app.state.attacks, app.state.certifier = registry, attacks, certifier
        if settings.api_key is None and not is_loopback(settings.host):
            log.warning("/attack is open to anyone who can reach this address: set SATML_API_KEY to guard it",
                        extra=fields(event="attack_open", host=settings.host, port=settings.port))
        log.info("service started", extra=fields(event="started", models=sorted(registry.models),
                                                 skipped=sorted(registry.skipped), default_model=registry.default))
        try:
            yield
        finally:
            attacks.close()
            certifier.close()
            registry.close_loop_batchers()
            # within the grace period uvicorn already spent on in-flight requests: a stuck batch cannot hold exit
            await run_in_threadpool(registry.close, min(5.0, settings.shutdown_grace_s / 3))
            sys.setswitchinterval(switch_interval)
            if froze:
                gc.unfreeze()
            metrics.process_ending()
            log.info("service stopped", extra=fields(event="stopped"))

    app = FastAPI(title="Robust SSL classifier", version=_version(), description=DESCRIPTION, lifespan=lifespan,
                  **telemetry_options(settings.otel))
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in ROUTERS:  # each APIRoute already carries its router's prefix, tags and dependencies: added to the
        # app's router as they are (the same OpenAPI); FastAPI 0.165's include_router would wrap each router in an
        # _IncludedRouter, whose per-request matching layers cost ~5-8 % of the event loop (issue 17's profile)
        app.router.routes.extend(router.routes)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # added last = outermost: request context sees every response, including 413s and CORS preflights
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(AdmissionMiddleware, max_requests=settings.max_concurrent_requests,  # before any body is read
                       inflight=inflight)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", REQUEST_ID_HEADER],
                           expose_headers=[REQUEST_ID_HEADER, "Retry-After"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
