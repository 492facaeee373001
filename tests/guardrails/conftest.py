"""Guardrail fixtures: one real Presidio guard per test session, built with every socket blocked."""

from __future__ import annotations

import pytest
from guard_helpers import sockets_blocked

from fintune.config import GuardrailSettings
from fintune.guardrails import PIIGuard


@pytest.fixture(scope="session")
def guard() -> PIIGuard:
    """The default guard (shared analyzer), built offline: building it must not touch the network."""
    with sockets_blocked() as attempts:
        built = PIIGuard.from_settings(GuardrailSettings())
    assert attempts == [], f"building the guard tried the network: {attempts}"
    return built
