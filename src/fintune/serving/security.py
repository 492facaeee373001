"""Security and limits: the optional API key, the request body size limit and the request id.

* API key (``serving.api_key``; None leaves the service open): ``/v1/*`` needs ``X-API-Key: KEY`` or
  ``Authorization: Bearer KEY``; the comparison is constant-time (:func:`hmac.compare_digest`). A missing or
  wrong key is a 401 with ``WWW-Authenticate: Bearer``. ``/healthz``, ``/readyz`` and the metrics stay open.
* Body size (``serving.max_body_bytes``): :class:`BodySizeLimitMiddleware` answers 413 from the
  ``Content-Length`` header without reading the body, and stops reading a chunked body once it is over.
* Request id: :class:`RequestIdMiddleware` gives every request an id (the client's ``X-Request-ID`` when it is
  a UUID or a short safe token of at most four digits, else a new UUID), returns it in the ``X-Request-ID``
  header and keeps it in ``request.state.request_id`` for the bodies. The id is echoed in every response and
  written into the logs, so an id that could hold a number the guard masks (an SSN, a card, phone or account
  number: the shortest has six digits) is replaced, not echoed. A digit count, not the guard: its recognizers read
  prose and miss a number glued to a token (``req_536-22-8145``), and it would run on the event loop.
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from typing import Any

from fastapi import HTTPException, Request
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MAX_ID_DIGITS = 4
"""A client id other than a UUID with more digits is replaced: the shortest number the guard masks (an account or
routing number, ``guardrails.recognizers.EVIDENCE``) has six. Counted here, not with the guard's
``count_digits``: this module must not import Presidio (cli/inputs.py keeps the same limit for the same reason)."""
_UUID = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class ApiKeyChecker:
    """A FastAPI dependency that enforces the API key when one is configured."""

    def __init__(self, api_key: SecretStr | None) -> None:
        """``api_key`` None: every request passes."""
        self._key = None if api_key is None else api_key.get_secret_value().encode("utf-8")

    def __call__(self, request: Request) -> None:
        """Pass, or raise 401 saying whether the key is missing or wrong (header bytes against the key's UTF-8)."""
        if self._key is None:
            return
        presented = presented_key(request)
        if presented is None:
            raise _unauthorized("missing API key: send it as `X-API-Key: KEY` or `Authorization: Bearer KEY`")
        if not hmac.compare_digest(presented.encode("latin-1", "replace"), self._key):
            raise _unauthorized("invalid API key")


def presented_key(request: Request) -> str | None:
    """The key the client sent in X-API-Key or as an Authorization bearer token, if any."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _unauthorized(message: str) -> HTTPException:
    """A 401 with the Bearer challenge."""
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": "Bearer"})


class _BodyTooLarge(HTTPException):
    """Raised inside receive() when a streamed body passes the limit: an HTTPException, which FastAPI re-raises
    while it reads a body (it turns any other error into a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status_code=413, detail=too_large_message(max_bytes))


class BodySizeLimitMiddleware:
    """Answer 413 to a request whose body is larger than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        """Wrap ``app``."""
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check Content-Length first, then count streamed bytes."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await self._reject(scope, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        """Send the 413 body."""
        await send_error(scope, send, 413, "body_too_large", too_large_message(self.max_bytes))


def too_large_message(max_bytes: int) -> str:
    """What a 413 says."""
    return f"request body is larger than {max_bytes} bytes (serving.max_body_bytes): send fewer or shorter texts"


def _content_length(scope: Scope) -> int | None:
    """The Content-Length header as an int, None when absent or malformed."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_error(
    scope: Scope, send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """Send an ErrorResponse body from ASGI middleware (before FastAPI's handlers exist for the request)."""
    body = json.dumps(
        {"error": {"code": code, "message": message, "retry_after_s": None}, "request_id": request_id_of(scope)}
    ).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def request_id_of(scope: Scope) -> str:
    """The request id RequestIdMiddleware stored in the scope ('' outside it)."""
    state: Any = scope.get("state") or {}
    return str(state.get("request_id", "")) if isinstance(state, dict) else ""


class RequestIdMiddleware:
    """Give every HTTP request an id and a start time, store both in the scope state and echo the id in
    X-Request-ID."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Assign the id and add the response header."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {}).update(request_id=request_id, started_at=time.perf_counter())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _client_id(scope: Scope) -> str | None:
    """The client's X-Request-ID when it may be echoed: a safe token (letters, digits, . _ -; at most 64) that is a
    UUID or holds at most four digits."""
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if _SAFE_ID.match(text) and (_is_uuid(text) or _few_digits(text)) else None
    return None


def _is_uuid(text: str) -> bool:
    """Whether ``text`` is a UUID, hyphenated or as 32 hex digits, with a letter among them: an id a generator
    made, echoed whatever its digits (a random one often holds runs of five and more). A UUID of digits only, which
    a generator all but never makes (about once in three million), could be a card number in a UUID's shape."""
    return _UUID.fullmatch(text) is not None and any(c.isalpha() for c in text)


def _few_digits(text: str) -> bool:
    """Whether ``text`` holds too few digits for any number the guard masks."""
    return sum(c.isdigit() for c in text) <= _MAX_ID_DIGITS
