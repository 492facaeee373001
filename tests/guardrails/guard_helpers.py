"""Test helpers for the guardrail tests (a unique module name, importable beside the tests)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def sockets_blocked() -> Iterator[list[str]]:
    """Make every connection attempt and DNS lookup fail; yields the list of attempts made meanwhile."""
    attempts: list[str] = []
    saved = {name: getattr(socket, name) for name in ("create_connection", "getaddrinfo")}
    saved_methods = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex")}

    def refuse(name: str) -> Any:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{name}{args[1:] if name.startswith('socket.') else args}")
            raise OSError(f"network access blocked in tests ({name})")
        return blocked

    for name in saved:
        setattr(socket, name, refuse(name))
    for name in saved_methods:
        setattr(socket.socket, name, refuse(f"socket.{name}"))
    try:
        yield attempts
    finally:
        for name, value in saved.items():
            setattr(socket, name, value)
        for name, value in saved_methods.items():
            setattr(socket.socket, name, value)
