"""GET /metrics: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"}})
def metrics(m: MetricsDep, request: Request) -> Response:
    """Requests by route and status, latency histograms, batch sizes, queue depths, attack outcomes,
    batch worker health (with several server processes: all of them; each process's worker health as of the last
    scrape it answered)."""
    registry = getattr(request.app.state, "registry", None)
    if registry is not None:
        registry.worker_states(request.app.state.settings.request_timeout_s, m)
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
