"""Cancel a request's work when its client goes away.

Starlette does not cancel a handler whose client disconnected, so a request abandoned by a client that timed out
would still wait in the micro-batcher's queue and cost model time. :func:`unless_disconnected` awaits the work
and, concurrently, the request's next ASGI message: once the body has been read that message is
``http.disconnect``, which arrives when the client closes the connection (or after the response is sent). The
work is then cancelled: a text still queued is dropped before it reaches the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from fintune.errors import FinTuneError

T = TypeVar("T")

CLIENT_CLOSED_STATUS = 499
"""nginx's status for a request whose client closed the connection (nobody receives it)."""


class ClientDisconnectedError(FinTuneError):
    """The client went away before its answer was ready; its work was cancelled."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of ``work`` (its body already read); ClientDisconnectedError, ``work`` cancelled, when the client
    disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientDisconnectedError("the client disconnected before its answer was ready")


async def _disconnect(request: Request) -> None:
    """Return when the request's client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
