"""GET /health/live and /health/ready: probes for orchestrators and the Docker healthcheck."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.errors import ErrorBody
from app.schemas import Live, ModelReadiness, NotReady, Ready

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=Live)
async def live() -> Live:
    """200 while the process answers HTTP at all."""
    return Live(status="ok")


@router.get("/ready", response_model=Ready, responses={503: {"model": NotReady, "description": "No model loaded"}})
async def ready(request: Request) -> Ready | JSONResponse:
    """200 once at least one model serves, with each model's device, runtime and index backend; else 503."""
    registry = getattr(request.app.state, "registry", None)
    models = {} if registry is None else {
        name: ModelReadiness(device=m.device, runtime=m.runtime, index=m.index, classes=len(m.classes),
                             bank_size=int(m.artifact.bank.shape[0]))
        for name, m in registry.models.items()}
    body = Ready(status="ready" if models else "not_ready", models=models,
                 default_model=None if registry is None else registry.default,
                 skipped={} if registry is None else dict(registry.skipped))
    if models:
        return body
    message = "no model loaded" + (f"; skipped: {', '.join(body.skipped)}" if body.skipped else "")
    not_ready = NotReady(**body.model_dump(), error=ErrorBody(code="not_ready", message=message))
    return JSONResponse(not_ready.model_dump(), status_code=503)
