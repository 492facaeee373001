"""Fixtures of the serving tests: a keyword classifier at the model edge, the real PII guard, tiny-data settings.

The classifier is the only fake: the guard is real Presidio, the breaker, monitor, batcher and TF-IDF baseline
are the real ones, and model faults come from the real ``serving.faults`` setting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fintune.config import Settings, load_settings
from fintune.guardrails import PIIGuard
from fintune.monitoring import SystemMonitor
from fintune.serving import create_app
from fintune.serving.model_adapter import Prediction

PII_TEXT = "Call John at 212-555-0198 or mail john.doe@example.com about card 4111 1111 1111 1111."
PII_VALUES = ("212-555-0198", "john.doe@example.com", "4111 1111 1111 1111", "4111111111111111")


class KeywordClassifier:
    """A deterministic stand-in for the model: keywords decide the label; it remembers what it was shown."""

    name, profile, version = "keyword-test-model", "test", "1"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def classify(self, texts: list[str]) -> list[Prediction]:
        """positive for 'rose/increased', negative for 'fell/decreased', else neutral."""
        with self.lock:
            self.batches.append(list(texts))
        return [self._one(t) for t in texts]

    @staticmethod
    def _one(text: str) -> Prediction:
        lowered = text.lower()
        label = ("positive" if any(w in lowered for w in ("rose", "increased")) else
                 "negative" if any(w in lowered for w in ("fell", "decreased")) else "neutral")
        scores = {k: 0.1 for k in ("negative", "neutral", "positive")} | {label: 0.8}
        return Prediction(label, 0.8, scores)

    @property
    def seen(self) -> list[str]:
        """Every text the model was given."""
        return [t for batch in self.batches for t in batch]


@pytest.fixture(scope="session")
def guard() -> PIIGuard:
    """The real Presidio guard of the default settings (built once per session)."""
    return PIIGuard.from_settings(load_settings("tiny-mistral").guardrails)


@pytest.fixture
def serving_settings(tiny_data_dir: Path, tmp_path: Path) -> Settings:
    """tiny-mistral settings on the tiny PhraseBank (the baseline fits on it in well under a second)."""
    return load_settings("tiny-mistral", data_dir=tiny_data_dir, output_dir=tmp_path / "out",
                         cache_dir=tmp_path / "cache")


def with_serving(settings: Settings, **fields: object) -> Settings:
    """``settings`` with some serving fields replaced (validated)."""
    serving = type(settings.serving).model_validate(settings.serving.model_dump() | fields)
    return settings.model_copy(update={"serving": serving})


def make_client(settings: Settings, guard: PIIGuard, classifier: object | None = None, **kwargs: object) -> TestClient:
    """A TestClient of the app with the keyword classifier (or the one given) and a fresh monitor."""
    app = create_app(settings, classifier=classifier or KeywordClassifier(), guard=guard,
                     monitor=SystemMonitor(settings.monitoring), **kwargs)
    return TestClient(app)


@pytest.fixture
def client(serving_settings: Settings, guard: PIIGuard) -> Iterator[TestClient]:
    """A started in-process app (lifespan run) whose model is ready."""
    with make_client(serving_settings, guard) as test_client:
        wait_ready(test_client)
        yield test_client


def wait_ready(test_client: TestClient, timeout_s: float = 30.0) -> None:
    """Block until the background model load has finished."""
    services = test_client.app.state.services  # type: ignore[attr-defined]
    test_client.portal.call(services.wait_until_loaded)  # type: ignore[union-attr]
    assert services.pipeline.slot.ready, services.pipeline.slot.error
