"""POST /v1/analyze: a long document, sentence by sentence, and its aggregate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fintune.serving.dependencies import get_request_id, get_services, require_api_key
from fintune.serving.disconnect import unless_disconnected
from fintune.serving.schemas import ANALYZE_ERRORS, AnalyzeRequest, AnalyzeResponse
from fintune.serving.service import Services

router = APIRouter(prefix="/v1", tags=["analyze"], dependencies=[Depends(require_api_key)])


@router.post("/analyze", response_model=AnalyzeResponse, responses=ANALYZE_ERRORS, summary="Analyse a document")
async def analyze(
    body: AnalyzeRequest,
    services: Annotated[Services, Depends(get_services)],
    request_id: Annotated[str, Depends(get_request_id)],
    request: Request,
) -> dict:
    """Split into sentences, classify them in batches; label shares, weighted score, extreme sentences."""
    return {**await unless_disconnected(request, services.analyze(body.text)), "request_id": request_id}
