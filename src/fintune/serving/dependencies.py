"""FastAPI dependencies: the app's Services, the request id and the API key check."""

from __future__ import annotations

from fastapi import Request

from fintune.serving.service import Services


def get_services(request: Request) -> Services:
    """The Services of the app handling this request."""
    return request.app.state.services


def get_request_id(request: Request) -> str:
    """The id RequestIdMiddleware gave this request."""
    return str(getattr(request.state, "request_id", ""))


def require_api_key(request: Request) -> None:
    """401 unless the request carries the configured API key (no key configured: open)."""
    checker = get_services(request).api_key
    if checker is not None:
        checker(request)
