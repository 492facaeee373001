"""POST /v1/classify and /v1/classify/batch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fintune.serving.dependencies import get_request_id, get_services, require_api_key
from fintune.serving.disconnect import unless_disconnected
from fintune.serving.schemas import (
    BATCH_ERRORS,
    CLASSIFY_ERRORS,
    BatchRequest,
    BatchResponse,
    ClassifyRequest,
    ClassifyResponse,
)
from fintune.serving.service import Services

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_api_key)])


@router.post("/classify", response_model=ClassifyResponse, responses=CLASSIFY_ERRORS, summary="Classify one text")
async def classify(
    body: ClassifyRequest,
    services: Annotated[Services, Depends(get_services)],
    request_id: Annotated[str, Depends(get_request_id)],
    request: Request,
) -> dict:
    """Label, scores and confidence of one text, after PII masking; degraded when the baseline answered."""
    return {**await unless_disconnected(request, services.classify(body.text)), "request_id": request_id}


@router.post("/classify/batch", response_model=BatchResponse, responses=BATCH_ERRORS,
             summary="Classify several texts")
async def classify_batch(
    body: BatchRequest,
    services: Annotated[Services, Depends(get_services)],
    request_id: Annotated[str, Depends(get_request_id)],
    request: Request,
) -> dict:
    """One entry per text, in input order; a bad text gets its own error and does not fail the others."""
    return {**await unless_disconnected(request, services.classify_batch(body.texts)), "request_id": request_id}
