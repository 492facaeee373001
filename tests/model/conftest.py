"""Fixtures of the model tests: one model cache per test session, tiny-mistral settings on tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest

from fintune.config import Settings, load_settings


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by the session's model tests (the SmolLM2 conversion happens once)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def tiny_settings(tiny_data_dir: Path, model_cache: Path, tmp_path: Path) -> Settings:
    """The tiny-mistral profile reading the tiny PhraseBank, writing under tmp_path."""
    return load_settings("tiny-mistral", data_dir=tiny_data_dir, cache_dir=model_cache, output_dir=tmp_path / "out")
