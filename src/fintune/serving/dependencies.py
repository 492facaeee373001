"""FastAPI dependencies: the app's Services, the request id and the API key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from fintune.serving.service import Services

# Declared for the OpenAPI schema (securitySchemes, and the Authorize button at /docs); the key itself is checked
# by Services.api_key, which reads the same two headers. auto_error=False: without a configured key no header is
# needed, and a wrong one is our 401, not FastAPI's 403.
_KEY_NEEDED = "Needed only when serving.api_key (FINTUNE_SERVING__API_KEY) is set."
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False, description=_KEY_NEEDED)
BEARER_TOKEN = HTTPBearer(scheme_name="Bearer", auto_error=False,
                          description=f"The API key as a bearer token. {_KEY_NEEDED}")


def get_services(request: Request) -> Services:
    """The Services of the app handling this request."""
    return request.app.state.services


def get_request_id(request: Request) -> str:
    """The id RequestIdMiddleware gave this request."""
    return str(getattr(request.state, "request_id", ""))


def require_api_key(
    request: Request,
    _header_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
    _bearer_key: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_TOKEN)] = None,
) -> None:
    """401 unless the request carries the configured API key (no key configured: open)."""
    checker = get_services(request).api_key
    if checker is not None:
        checker(request)
