"""GET /health/live and /health/ready: probes for orchestrators and the Docker healthcheck."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from app.errors import ErrorBody
from app.schemas import Live, ModelReadiness, NotReady, Ready

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=Live)
async def live() -> Live:
    """200 while the process answers HTTP at all."""
    return Live(status="ok")


@router.get("/ready", response_model=Ready,
            responses={503: {"model": NotReady, "description": "Not serving: no model, the configured default "
                                                                "model missing, or a batch worker dead or stuck"}})
async def ready(request: Request) -> Ready | JSONResponse:
    """200 when the configured default model serves and every batch worker is alive and making progress
    (no batch past the request deadline), with each model's device, runtime, index backend and worker; else 503."""
    body, problem = readiness(request.app)
    if problem is None:
        return body
    not_ready = NotReady(**body.model_dump(), error=ErrorBody(code="not_ready", message=problem))
    return JSONResponse(not_ready.model_dump(), status_code=503)


def readiness(app: FastAPI) -> tuple[Ready, str | None]:
    """The readiness report and, when the app is not ready, why (None when it is). One definition for
    /health/ready, /v2/health/ready and a Ray Serve replica's health check."""
    registry = getattr(app.state, "registry", None)
    settings = app.state.settings
    states = {} if registry is None else registry.worker_states(settings.request_timeout_s, app.state.metrics)
    models = {} if registry is None else {
        name: ModelReadiness(device=m.device, runtime=m.runtime, index=m.index, classes=len(m.classes),
                             bank_size=m.bank_size, worker=states[name])
        for name, m in registry.models.items()}
    problems = []
    if models and settings.default_model not in models:
        problems.append(f"the configured default model {settings.default_model!r} is not loaded")
    if bad := {name: state for name, state in states.items() if state != "ok"}:
        problems.append("batch worker " + ", ".join(f"{name} {state}" for name, state in sorted(bad.items())))
    body = Ready(status="ready" if models and not problems else "not_ready", models=models,
                 default_model=None if registry is None else registry.default,
                 skipped={} if registry is None else dict(registry.skipped))
    if models and not problems:
        return body, None
    message = "; ".join(problems) if models else "no model loaded"
    message += f"; skipped: {', '.join(body.skipped)}" if body.skipped else ""
    return body, message
