"""GET /metrics (Prometheus text format) and GET /metrics/json (the monitor's snapshot plus serving state).

Plain functions, run in FastAPI's thread pool: both read the breaker, a Redis call when it is shared."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fintune.serving.dependencies import get_request_id, get_services
from fintune.serving.schemas import MetricsSnapshot
from fintune.serving.service import Services

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(services: Annotated[Services, Depends(get_services)]) -> Response:
    """The monitor's registry in Prometheus text format."""
    return Response(generate_latest(services.current_monitor().prometheus_registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/json", response_model=MetricsSnapshot, summary="Monitor snapshot (JSON)")
def metrics_json(
    services: Annotated[Services, Depends(get_services)], request_id: Annotated[str, Depends(get_request_id)]
) -> dict[str, Any]:
    """Requests, latency percentiles, errors, predictions, drift, health score, breaker, batching."""
    serving: dict[str, Any] = {}
    if services.pipeline is not None and services.batcher is not None:
        serving = {
            **services.pipeline.describe(),
            "queue_depth": services.batcher.depth,
            "batching": services.batcher.stats.as_dict(),
        }
    return {**services.current_monitor().snapshot(), "serving": serving, "request_id": request_id}
