"""Fixtures of the serving tests (helpers in serving_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serving_helpers import make_client, tiny_settings, wait_ready

from fintune.config import Settings, load_settings
from fintune.guardrails import PIIGuard


@pytest.fixture(scope="session")
def guard() -> PIIGuard:
    """The real Presidio guard of the default settings (built once per session)."""
    return PIIGuard.from_settings(load_settings("tiny-mistral").guardrails)


@pytest.fixture
def serving_settings(tiny_data_dir: Path, tmp_path: Path) -> Settings:
    """tiny-mistral settings on the tiny PhraseBank, writing under tmp_path."""
    return tiny_settings(tiny_data_dir, tmp_path)


@pytest.fixture
def client(serving_settings: Settings, guard: PIIGuard) -> Iterator[TestClient]:
    """A started in-process app (lifespan run) whose model is ready."""
    with make_client(serving_settings, guard) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="session")
def write_phrasebank(request: pytest.FixtureRequest) -> Callable[[Path], Path]:
    """tests/conftest.py's write_tiny_phrasebank, for module-scoped fixtures (tiny_data_dir is per test)."""
    root = request.config.pluginmanager.get_plugin(str(Path(__file__).resolve().parents[1] / "conftest.py"))
    assert root is not None, "tests/conftest.py is not loaded"
    return root.write_tiny_phrasebank
