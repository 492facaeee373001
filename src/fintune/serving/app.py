"""The FastAPI app factory and its lifespan.

``create_app(settings, classifier=..., guard=..., breaker=..., monitor=..., fallback=...)`` builds one app;
every part is injectable (tests pass a small classifier), and whatever is not passed is built from the settings
at start-up: the PII guard (``PIIGuard.from_settings``), the breaker (``CircuitBreaker.from_settings``), the
process's ``SystemMonitor``, the TF-IDF baseline of the degraded mode, and the model, which loads in the
background (until it is ready the service answers degraded and ``/readyz`` says 503).

Shutdown is graceful: uvicorn stops accepting connections and waits for in-flight requests
(``serving.shutdown_timeout_s``), then the lifespan drains the micro-batcher's queue before it stops.
:func:`app_from_env` is the import-string factory ``fintune serve`` gives uvicorn (one app per worker).
"""

from __future__ import annotations

import email.message
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fintune import __version__
from fintune.config import Settings, load_settings
from fintune.errors import InvalidInputError, ModelUnavailableError, ServiceOverloadedError
from fintune.monitoring import SystemMonitor
from fintune.reliability import CircuitBreaker
from fintune.serving.dependencies import get_request_id
from fintune.serving.disconnect import CLIENT_CLOSED_STATUS, ClientDisconnectedError
from fintune.serving.model_adapter import BatchClassifier
from fintune.serving.pipeline import Guard
from fintune.serving.routers import analyze, classify, health, metrics
from fintune.serving.schemas import publish_limits
from fintune.serving.security import REQUEST_ID_HEADER, BodySizeLimitMiddleware, RequestIdMiddleware
from fintune.serving.service import AUTO, ClassifierSource, ItemFailedError, Services

logger = logging.getLogger(__name__)

DESCRIPTION = """Financial sentiment (negative / neutral / positive) with PII masking before the model, a circuit
breaker around it, dynamic micro-batching, a TF-IDF degraded mode and monitoring. Every response carries a
`request_id` (body and `X-Request-ID` header)."""


def create_app(
    settings: Settings | None = None,
    *,
    classifier: ClassifierSource = None,
    guard: Guard | None = None,
    breaker: CircuitBreaker | None = None,
    monitor: SystemMonitor | None = None,
    fallback: BatchClassifier | None | Literal["auto"] = AUTO,
) -> FastAPI:
    """The service for ``settings`` (default: the active profile); pass parts to replace the built ones.

    ``classifier``: a BatchClassifier, a function loading one, or None (the profile's model). ``fallback``:
    the degraded mode's classifier, None for no degraded mode, or "auto" (the TF-IDF baseline).
    """
    settings = settings or load_settings()
    services = Services(
        settings=settings,
        classifier=classifier,
        guard=guard,
        breaker=breaker or CircuitBreaker.from_settings(settings.reliability, scope=settings.profile),
        monitor=monitor or SystemMonitor.instance(settings.monitoring),
        fallback=fallback,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        logger.info("fintune service started (profile %s)", settings.profile)
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(title="FinTune", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.services = services
    for router in (classify.router, analyze.router, health.router, metrics.router):
        app.include_router(router)
    _add_error_handlers(app)
    _publish_limits(app, settings)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.serving.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so even a 413 carries the id
    return app


def _publish_limits(app: FastAPI, settings: Settings) -> None:
    """Make /openapi.json state the text, document and batch limits of ``settings.serving``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = publish_limits(build(), settings.serving)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """The app for the active profile (``FINTUNE_PROFILE`` and ``FINTUNE_*`` overrides): uvicorn's factory."""
    return create_app(load_settings())


def _error(request: Request, status: int, code: str, message: str, retry_after: float | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """An ErrorResponse carrying the request id in its body and header (a 500 is sent from outside the request-id
    middleware, which adds the header to every other response); a Retry-After header when retrying makes sense."""
    headers = {**(headers or {}), REQUEST_ID_HEADER: get_request_id(request)}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(retry_after))))
    body = {"error": {"code": code, "message": message, "retry_after_s": retry_after},
            "request_id": get_request_id(request)}
    return JSONResponse(body, status_code=status, headers=headers)


def _readable(errors: Any) -> tuple[int, str, str]:
    """Status, code and one readable message for FastAPI's validation errors."""
    invalid = [e for e in errors if e.get("type") == "json_invalid"]
    if invalid:
        cause = str((invalid[0].get("ctx") or {}).get("error", ""))
        hint = "raw control characters must be escaped" if "control character" in cause else "check its syntax"
        return 400, "invalid_json", f"request body is not valid JSON ({cause or 'decode error'}; {hint})"
    parts = []
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "extra_forbidden" and loc:  # the client's own key, which may quote anything, PII too
            loc[-1] = "<unknown field>"
        where = ".".join(str(p) for p in loc) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return 422, "invalid_request", "; ".join(parts)


def _unauthenticated(request: Request) -> StarletteHTTPException | None:
    """The 401 a /v1 request without the configured key gets, or None (no key configured, the right key, or not
    a /v1 path)."""
    services = getattr(request.app.state, "services", None)
    checker = getattr(services, "api_key", None)
    if checker is None or not request.url.path.startswith("/v1/"):
        return None
    try:
        checker(request)
    except StarletteHTTPException as exc:
        return exc
    return None


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """An HTTPException as an ErrorResponse (a body FastAPI could not parse as ``invalid_body``)."""
    code, message = _http_code(exc.status_code), str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        code, message = "invalid_body", ("request body could not be parsed as JSON: check its encoding (UTF-8), "
                                         "its nesting (at most a few hundred levels) and the size of its numbers "
                                         "(at most 4,300 digits)")
    return _error(request, exc.status_code, code, message, headers=getattr(exc, "headers", None))


def _add_error_handlers(app: FastAPI) -> None:
    """Every error becomes an ErrorResponse with the request id and the right status."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        denied = _unauthenticated(request)  # FastAPI parses the body before any dependency: the key comes first
        if denied is not None:
            return _http_error(request, denied)
        unsupported = await _unsupported_media_type(request)
        if unsupported is not None:
            return _error(request, 415, "unsupported_media_type", unsupported)
        status, code, message = _readable(exc.errors())
        return _error(request, status, code, message)

    @app.exception_handler(InvalidInputError)
    async def on_invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return _error(request, 422, "invalid_input", str(exc))

    @app.exception_handler(ServiceOverloadedError)
    async def on_overload(request: Request, exc: ServiceOverloadedError) -> JSONResponse:
        return _error(request, 503, "overloaded", str(exc), exc.retry_after_s)

    @app.exception_handler(ModelUnavailableError)
    async def on_unavailable(request: Request, exc: ModelUnavailableError) -> JSONResponse:
        return _error(request, 503, "model_unavailable", str(exc), exc.retry_after_s)

    @app.exception_handler(ClientDisconnectedError)
    async def on_client_gone(request: Request, exc: ClientDisconnectedError) -> Response:
        return Response(status_code=CLIENT_CLOSED_STATUS)

    @app.exception_handler(ItemFailedError)
    async def on_item_failed(request: Request, exc: ItemFailedError) -> JSONResponse:
        e = exc.error
        return _error(request, e.status, e.code, e.message, e.retry_after_s)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        denied = _unauthenticated(request) if exc.status_code == 400 else None
        return _http_error(request, denied or exc)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s (request id %s)", request.method, request.url.path,
                         get_request_id(request))
        services = getattr(request.app.state, "services", None)
        if services is not None and request.url.path.startswith("/v1/"):  # a failed classification, not /metrics
            started = getattr(request.state, "started_at", None)
            services.monitor.record(0.0 if started is None else time.perf_counter() - started, error="internal_error")
        return _error(request, 500, "internal_error", "internal error; the request id identifies it in the logs")


async def _unsupported_media_type(request: Request) -> str | None:
    """Why the body was not read as JSON, when its Content-Type is the reason (None when it is not).

    FastAPI reads a body of another media type, or one sent with no Content-Type at all (its strict default,
    which keeps a browser's form or ``fetch`` from posting JSON across origins), as no JSON and reports "Input
    should be a valid dictionary", which names neither the header nor the fix."""
    header = request.headers.get("content-type", "")
    if not header:
        if not await request.body():  # no body at all: the missing fields say it
            return None
        return "the request has no Content-Type header: send the body as JSON with Content-Type: application/json"
    if _parsed_as_json(header):
        return None
    media_type = header.split(";")[0].strip().lower()
    return f"send the body as JSON with Content-Type: application/json (got {_shown(media_type)})"


def _parsed_as_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/*+json, parsed
    as FastAPI parses it (``email.message``), so that the two never disagree."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


_MEDIA_TYPE = re.compile(r"[a-z]+/[a-z.+-]{1,60}")  # no digits, no @: a header can carry anything, PII too


def _shown(media_type: str) -> str:
    """The client's media type quoted back when it looks like one, else a placeholder."""
    return repr(media_type) if _MEDIA_TYPE.fullmatch(media_type) else "another media type"


def _http_code(status: int) -> str:
    """A code name for a plain HTTP error."""
    return {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
            415: "unsupported_media_type"}.get(
        status, f"http_{status}"
    )
