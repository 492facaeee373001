"""The model edge of the service: the `BatchClassifier` protocol and the ONE place it meets fintune.model.

Everything else in ``fintune.serving`` sees only :class:`BatchClassifier` (``classify(texts) -> [Prediction]``
plus ``name``/``profile``/``version``), so tests build the app with any small classifier. Here live:

* :func:`load_classifier`: the profile's model: a trained folder through ``fintune.model.assessment``'s
  loader (QLoRA adapter or encoder, as its card says), or the untrained model when none exists (random
  tiny-mistral, zero-shot SmolLM2, the encoder with a fresh head: plumbing and load tests only);
* :class:`BaselineClassifier` and :func:`load_baseline`: the TF-IDF pipeline of the degraded mode;
* :class:`FaultInjectingClassifier`: the test-only faults of ``serving.faults`` (tests and the load
  benchmark switch them on through ``FINTUNE_SERVING__FAULTS__*``; nothing patches our classes).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fintune import LABELS
from fintune.config import FaultInjectionSettings, Settings
from fintune.errors import ArtifactError
from fintune.model.card import CARD_FILE, card_version, default_model_dir, read_card

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One text's label, its probability (the confidence) and the probability of every label."""

    label: str
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class BatchClassifier(Protocol):
    """What the service needs of a model: a name, a profile, a version and batched classification."""

    name: str
    profile: str
    version: str

    def classify(self, texts: list[str]) -> list[Prediction]:
        """One prediction per text, in order."""
        ...


class InjectedFault(RuntimeError):
    """A model failure injected on purpose by ``serving.faults`` (tests and the load benchmark only)."""


class ProbaClassifierAdapter:
    """Any fintune.model classifier with ``predict_proba(texts) -> (n, 3)`` (LABELS order) as a BatchClassifier.

    Both :class:`fintune.model.inference.SentimentClassifier` and :class:`fintune.model.encoder.EncoderClassifier`
    have it (the ``Classifier`` protocol of ``fintune.model.assessment``).
    """

    def __init__(self, inner: Any, name: str, profile: str, version: str) -> None:
        """Wrap ``inner``."""
        self.inner, self.name, self.profile, self.version = inner, name, profile, version

    def classify(self, texts: list[str]) -> list[Prediction]:
        """``inner.predict_proba`` as Predictions."""
        rows = np.asarray(self.inner.predict_proba(texts), dtype=float)
        return [_prediction(LABELS, row) for row in rows]


def _prediction(classes: Sequence[str], row: np.ndarray) -> Prediction:
    """A prediction from one row of class probabilities (labels missing from ``classes`` score 0)."""
    scores = {label: 0.0 for label in LABELS} | {str(c): float(p) for c, p in zip(classes, row, strict=True)}
    best = int(row.argmax())
    return Prediction(str(classes[best]), float(row[best]), scores)


class FaultInjectingClassifier:
    """Wraps a classifier; raises :class:`InjectedFault` on a seeded share of calls inside a time window."""

    def __init__(self, inner: BatchClassifier, faults: FaultInjectionSettings, clock: Any = time.monotonic,
                 previous: FaultInjectingClassifier | None = None) -> None:
        """Faults are drawn with ``faults.seed`` and counted from now (the moment the model is ready); a reloaded
        model's injector continues ``previous``'s window, draws and counts."""
        self.inner, self.faults, self.clock = inner, faults, clock
        self.name, self.profile, self.version = inner.name, inner.profile, inner.version
        self._lock = threading.Lock()
        if previous is None:
            self._random, self._started, self.injected = random.Random(faults.seed), clock(), 0
            self._last_fault_at: float | None = None
        else:
            self._random, self._started, self.injected = previous._random, previous._started, previous.injected
            self._last_fault_at = previous._last_fault_at

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Sleep ``delay_ms``, maybe raise, else classify."""
        if self.faults.delay_ms:
            time.sleep(self.faults.delay_ms / 1000)
        if self._draw():
            raise InjectedFault(f"injected model fault #{self.injected} (serving.faults.rate={self.faults.rate})")
        return self.inner.classify(texts)

    def _draw(self) -> bool:
        """Whether this call fails: inside [start_s, stop_s) and under the rate."""
        age = self.clock() - self._started
        f = self.faults
        if age < f.start_s or (f.stop_s is not None and age >= f.stop_s):
            return False
        with self._lock:
            failed = self._random.random() < f.rate
            self.injected += failed
            if failed:
                self._last_fault_at = self.clock()
        return failed

    def describe(self) -> dict[str, Any]:
        """Faults injected so far, and seconds since the last one (None before the first), for /metrics/json."""
        with self._lock:
            last = self._last_fault_at
            return {"injected": self.injected,
                    "last_fault_age_s": None if last is None else round(self.clock() - last, 3)}


def with_faults(classifier: BatchClassifier, faults: FaultInjectionSettings,
                previous: FaultInjectingClassifier | None = None) -> BatchClassifier:
    """``classifier`` wrapped in fault injection when the settings ask for faults or delay, else itself
    (``previous``: the injector of the model it reloads, whose window and counts go on)."""
    if faults.rate > 0 or faults.delay_ms > 0:
        logger.warning("serving.faults is on (rate %.2f, delay %.0f ms): for tests only", faults.rate,
                       faults.delay_ms)
        return FaultInjectingClassifier(classifier, faults, previous=previous)
    return classifier


def model_dir(settings: Settings) -> Path:
    """The adapter folder the service serves (``serving.model_dir`` or ``<output_dir>/models/<profile>``)."""
    return settings.serving.model_dir or default_model_dir(settings)


def load_classifier(settings: Settings) -> BatchClassifier:
    """The profile's model as a BatchClassifier (slow: seconds to minutes; run it off the event loop).

    A trained folder (``fintune.json``) is loaded as its card says (QLoRA adapter or encoder). Without one the
    untrained model is served, for plumbing and load tests only: the QLoRA profile's base, label-constrained
    (random for tiny-mistral, zero-shot for SmolLM2), or the encoder with a fresh head; but an explicit
    ``serving.model_dir`` without one is an :class:`ArtifactError` (a mistyped path must not serve noise).
    """
    folder = model_dir(settings)
    name = settings.model.base_model
    if (folder / CARD_FILE).is_file():
        from fintune.model.assessment import load_classifier as load_trained

        card, version = read_card(folder), card_version(folder)
        logger.info("serving the trained model in %s as version %s", folder, version)
        # named as its card says: a folder served under another profile is still the model it was trained as
        return ProbaClassifierAdapter(load_trained(folder, settings), card.get("base_model") or name,
                                      card.get("profile") or settings.profile, version)
    if settings.serving.model_dir is not None:  # asked for by name: never stand in an untrained model
        raise ArtifactError(
            f"serving.model_dir {folder} holds no trained model ({CARD_FILE} missing): point it at a folder "
            "written by `fintune train`, or unset it to serve the profile's default folder"
        )
    logger.warning("no trained model in %s: serving the untrained %s model of profile %r (run `fintune train`)",
                   folder, settings.model.backend, settings.profile)
    if settings.model.backend == "encoder":
        from fintune.model.encoder import EncoderClassifier

        inner = EncoderClassifier.from_base(settings.model.encoder)
        return ProbaClassifierAdapter(inner, name, settings.profile, "untrained-head")
    return ProbaClassifierAdapter(_untuned(settings), name, settings.profile, "base-untuned")


def _untuned(settings: Settings) -> Any:
    """A SentimentClassifier over the profile's base model without an adapter (label-constrained zero-shot)."""
    from fintune.model.inference import SentimentClassifier, prepare_base
    from fintune.model.loading import load_tokenizer, resolve_base
    from fintune.model.quantization import load_base

    source = resolve_base(settings.model, settings.cache_dir)
    inference = settings.model.inference
    # the profile's inference path, as with a trained adapter
    base = prepare_base(load_base(source, settings.model), settings.model, inference, inference.merge_adapter)
    return SentimentClassifier(base, load_tokenizer(source), settings.model.training.prompt_template, inference)


class BaselineClassifier:
    """A fitted TF-IDF pipeline as a BatchClassifier: probabilities when it has them, else a one-hot score."""

    def __init__(self, pipeline: Any, name: str, profile: str, version: str) -> None:
        """Wrap a fitted scikit-learn pipeline whose classes are the three labels."""
        self.pipeline, self.name, self.profile, self.version = pipeline, name, profile, version

    def classify(self, texts: list[str]) -> list[Prediction]:
        """One prediction per text."""
        if not texts:
            return []
        if hasattr(self.pipeline, "predict_proba"):
            classes = [str(c) for c in self.pipeline.classes_]
            rows = np.asarray(self.pipeline.predict_proba(texts), dtype=float)
            return [_prediction(classes, row) for row in rows]
        return [Prediction(str(label), 1.0, {k: float(k == label) for k in LABELS})
                for label in self.pipeline.predict(texts)]


def load_baseline(settings: Settings) -> BatchClassifier | None:
    """The degraded mode's TF-IDF baseline: the saved pipeline, else one fitted now; None when neither works."""
    from fintune.baselines import build_pipeline, load_pipeline

    name = settings.serving.baseline_model
    path = settings.serving.baseline_path or settings.output_dir / "baselines" / settings.data.subset / f"{name}.joblib"
    label = f"tfidf-{name}"
    try:
        if path.is_file():
            return BaselineClassifier(load_pipeline(path), label, settings.profile, f"file:{path.name}")
        from fintune.data import load_splits

        splits = load_splits(settings)
        pipeline = build_pipeline(name, settings.baselines)
        pipeline.fit([e.text for e in splits.train], [e.label for e in splits.train])
        return BaselineClassifier(pipeline, label, settings.profile, f"fitted:{splits.fingerprint[:12]}")
    except Exception as exc:  # noqa: BLE001 (a truncated joblib raises EOFError, an old one AttributeError...)
        logger.warning("degraded mode unavailable: no TF-IDF baseline (%s: %s)", type(exc).__name__, exc)
        return None

