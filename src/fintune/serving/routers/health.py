"""GET /healthz (the process is alive) and GET /readyz (model loaded and breaker not open); both open, both also
answer HEAD (uptime probes that send HEAD would otherwise read 405 as down).

The handlers are plain functions, which FastAPI runs in its thread pool: reading a shared breaker is a Redis call
(up to seconds when Redis is slow or its lock is held) and must not stall the event loop."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from fintune.serving.dependencies import get_request_id, get_services
from fintune.serving.schemas import HealthResponse
from fintune.serving.service import Services

router = APIRouter(tags=["health"])
_NOT_READY = {
    503: {"model": HealthResponse, "description": "not_ready: the model is not loaded, or the breaker is open."}
}


def _body(services: Services, status: str, request_id: str) -> dict:
    """The HealthResponse fields."""
    pipeline = services.pipeline
    return {
        "status": status,
        "model": pipeline.slot.status if pipeline else "loading",
        "breaker": services.breaker.state.value,
        "degraded_available": bool(pipeline and pipeline.degraded_available),
        "request_id": request_id,
    }


# One route per method (GET and HEAD), not one route with both: the two operations then get distinct OpenAPI
# operationIds (healthz_healthz_get, healthz_healthz_head) instead of one id twice.
@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
@router.head("/healthz", response_model=HealthResponse, summary="Liveness")
def healthz(
    services: Annotated[Services, Depends(get_services)], request_id: Annotated[str, Depends(get_request_id)]
) -> dict:
    """200 while the process serves HTTP."""
    return _body(services, "ok", request_id)


@router.get("/readyz", response_model=HealthResponse, responses=_NOT_READY, summary="Readiness")
@router.head("/readyz", response_model=HealthResponse, responses=_NOT_READY, summary="Readiness")
def readyz(
    services: Annotated[Services, Depends(get_services)], request_id: Annotated[str, Depends(get_request_id)]
) -> JSONResponse:
    """200 when the model is loaded and the breaker is not open, else 503."""
    pipeline = services.pipeline
    ready = bool(pipeline and pipeline.slot.ready and services.breaker.state.value != "open")
    body = _body(services, "ready" if ready else "not_ready", request_id)
    return JSONResponse(body, status_code=200 if ready else 503)
