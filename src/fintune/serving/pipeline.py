"""The request pipeline: validate -> PII guard -> breaker-wrapped model -> output checks -> monitor -> answer.

:class:`ClassificationPipeline` is shared by the HTTP service (through the micro-batcher) and the offline
``fintune classify`` command, so both run exactly the same steps. For one batch of texts
(:meth:`~ClassificationPipeline.process_batch`, run in the batcher's worker thread):

1. the guard masks PII in every text (one spaCy pass); if it fails the batch fails closed: nothing
   unmasked goes further;
2. the model classifies the masked texts through the RecoveryManager and the circuit breaker;
3. when the model is not ready, failed, or its breaker is open: the TF-IDF baseline answers with
   ``degraded: true`` (``serving.degraded_mode: baseline``), or each item gets a 503 error (``fail``);
4. the guard's output checks (low confidence, invalid label) are added to each result.

:meth:`~ClassificationPipeline.record` then records each item in the monitor. Texts are logged only redacted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fintune import LABELS
from fintune.config import RecoverySettings, Settings
from fintune.errors import CircuitOpenError, InvalidInputError, ModelError
from fintune.guardrails import GuardrailResult
from fintune.reliability import BreakerState, CircuitBreaker, RecoveryManager
from fintune.serving.documents import is_blank
from fintune.serving.model_adapter import BatchClassifier, FaultInjectingClassifier, Prediction, with_faults

logger = logging.getLogger(__name__)
ALLOWED_CONTROLS = frozenset("\t\n\r")


class Guard(Protocol):
    """What the pipeline needs of the PII guard (fintune.guardrails.PIIGuard)."""

    def redact_batch(self, texts: list[str]) -> list[GuardrailResult]:
        """Masked texts, in order."""
        ...

    def detect(self, text: str) -> list[Any]:
        """The PII spans (objects with ``start``, ``end`` and ``entity_type``) of one text."""
        ...

    def detect_batch(self, texts: Sequence[str]) -> list[list[Any]]:
        """The PII spans (objects with ``start`` and ``end``) of each text, in order."""
        ...

    def mask(self, text: str, spans: list[Any]) -> GuardrailResult:
        """``text`` with ``spans`` replaced by ``<TYPE>``."""
        ...

    def check_output(self, result: GuardrailResult, label: str, confidence: float) -> GuardrailResult:
        """``result`` with low_confidence and invalid_label set."""
        ...


class Monitor(Protocol):
    """What the pipeline needs of the monitor (fintune.monitoring.SystemMonitor)."""

    def record(self, latency_s: float, label: str | None = None, error: BaseException | str | None = None) -> None:
        """Record one request."""
        ...

    def record_pii(self, entity_type: str, count: int = 1) -> None:
        """Count masked PII."""
        ...

    def record_fallback(self, reason: str = "fallback") -> None:
        """Count a degraded answer."""
        ...

    def recent_latencies(self) -> list[float]:
        """Latencies of the recent requests."""
        ...


@dataclass(frozen=True)
class ItemError:
    """Why one text got no answer, with the HTTP status it maps to."""

    code: str
    message: str
    status: int
    retry_after_s: float | None = None


@dataclass
class StageTimes:
    """Seconds the batch path spent in each step (the load benchmark reports the guard's share)."""

    guard_s: float = 0.0
    model_s: float = 0.0
    checks_s: float = 0.0
    batches: int = 0
    texts: int = 0

    def as_dict(self) -> dict[str, float]:
        """JSON-ready, with the guard's share of the batch time."""
        total = self.guard_s + self.model_s + self.checks_s
        return {**{k: round(v, 4) for k, v in self.__dict__.items()},
                "guard_share": round(self.guard_s / total, 4) if total else 0.0}


@dataclass(frozen=True)
class ModelTag:
    """Which model answered."""

    name: str
    profile: str
    version: str


@dataclass(frozen=True)
class ItemOutcome:
    """One text's outcome: a prediction with its guardrail result, or an error."""

    prediction: Prediction | None = None
    guardrail: GuardrailResult | None = None
    degraded: bool = False
    model: ModelTag | None = None
    error: ItemError | None = None


def validate_text(text: str, max_chars: int) -> str:
    """``text`` itself when it is classifiable; InvalidInputError saying what is wrong otherwise."""
    if is_blank(text):
        raise InvalidInputError("text is empty or only whitespace or invisible characters: send at least one word")
    if len(text) > max_chars:
        raise InvalidInputError(
            f"text has {len(text)} characters, more than the limit of {max_chars} (serving.max_text_chars): "
            "split it, or send it to /v1/analyze"
        )
    check_characters(text)
    return text


def check_characters(text: str, what: str = "text") -> None:
    """InvalidInputError at the first lone surrogate, or control character other than tab and newlines."""
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cs":
            raise InvalidInputError(f"{what} is not valid Unicode: lone surrogate U+{ord(char):04X} at {index}")
        if category == "Cc" and char not in ALLOWED_CONTROLS:
            raise InvalidInputError(
                f"{what} holds control character U+{ord(char):04X} at position {index}; only tab and newlines "
                "are allowed"
            )


def probabilities_or_none(p: Prediction, tolerance: float = 1e-6) -> Prediction | None:
    """``p`` with its confidence and scores clipped to 0..1 when each is a finite number at most ``tolerance``
    outside (float rounding of a softmax); None when any is NaN, infinite or further out."""
    values = [p.confidence, *p.scores.values()]
    if not all(math.isfinite(v) and -tolerance <= v <= 1 + tolerance for v in values):
        return None
    return Prediction(p.label, _unit(p.confidence), {label: _unit(v) for label, v in p.scores.items()})


def some_usable(predictions: list[Prediction]) -> list[Prediction]:
    """``predictions`` when at least one holds probabilities; ModelError when none does (a model answering NaN
    everywhere is broken, not a run of bad texts)."""
    if predictions and all(probabilities_or_none(p) is None for p in predictions):
        raise ModelError(f"the model answered no probabilities for any of {len(predictions)} texts (NaN, infinite "
                         "or outside 0..1)")
    return predictions


def _unit(value: float) -> float:
    """``value`` clipped to 0..1."""
    return min(1.0, max(0.0, value))


_NOT_READY = {"loading": "the model is still loading", "failed": "the model failed to load",
              "reloading": "the model is reloading after running out of memory"}


def guard_failed(exc: BaseException) -> ItemError:
    """The 500 an item gets when the PII guard raised (it fails closed: nothing unguarded goes further)."""
    return ItemError("guardrail_failed", f"the PII guard failed ({type(exc).__name__}); retry later", 500)


class ModelSlot:
    """The served model: whether it is loaded, and the RecoveryManager (with the breaker) that calls it."""

    def __init__(
        self, loader: Callable[[], BatchClassifier], settings: Settings, breaker: CircuitBreaker,
        reload_in_background: bool = False,
    ) -> None:
        """Nothing is loaded until :meth:`load`; ``reload_in_background`` as the RecoveryManager's (the service
        sets it from ``reliability.recovery.reload_in_background``)."""
        self.loader = loader
        self.reload_in_background = reload_in_background
        self.faults = settings.serving.faults
        self.recovery_settings: RecoverySettings = settings.reliability.recovery
        self.breaker = breaker
        self.state = "loading"
        self.error: str | None = None
        self.recovery: RecoveryManager[BatchClassifier] | None = None
        self.tag: ModelTag | None = None
        self.fault_injector: FaultInjectingClassifier | None = None

    def _with_faults(self, model: BatchClassifier) -> BatchClassifier:
        """``model`` wrapped in the configured fault injection, which is kept for :meth:`faults_seen`."""
        wrapped = with_faults(model, self.faults, previous=self.fault_injector)
        if isinstance(wrapped, FaultInjectingClassifier):
            self.fault_injector = wrapped
        return wrapped

    def faults_seen(self) -> dict[str, Any] | None:
        """The fault injector's count and age of its last fault; None when ``serving.faults`` is off."""
        return None if self.fault_injector is None else self.fault_injector.describe()

    def load(self) -> None:
        """Load the model (slow; call it in a thread); on failure the slot stays not ready."""
        try:
            model = self._with_faults(self.loader())
        except Exception as exc:  # any loader failure leaves the service up, degraded
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.error("model load failed, serving degraded: %s", self.error)
            return
        self.recovery = RecoveryManager(
            lambda: self._with_faults(self.loader()), self.recovery_settings, breaker=self.breaker,
            model=model, reload_in_background=self.reload_in_background,
        )
        self.tag = ModelTag(model.name, model.profile, model.version)
        self.state, self.error = "ready", None
        logger.info("model ready: %s (%s, %s)", model.name, model.profile, model.version)

    @property
    def ready(self) -> bool:
        """Whether the model can be called."""
        return self.state == "ready" and self.recovery is not None and not self.recovery.reloading

    @property
    def status(self) -> str:
        """``loading``, ``ready``, ``failed``, or ``reloading`` while a background reload runs after out of memory."""
        return "reloading" if self.recovery is not None and self.recovery.reloading else self.state

    def classify(self, texts: list[str]) -> list[Prediction]:
        """The model's predictions through recovery and breaker (CircuitOpenError while OPEN); a batch in which
        no text got probabilities is the model failing (the breaker counts it, the baseline answers)."""
        assert self.recovery is not None
        return self.recovery.call(lambda model: some_usable(model.classify(texts)))


class ClassificationPipeline:
    """Guard, breaker-wrapped model, degraded fallback, output checks and monitoring for batches of texts."""

    def __init__(
        self,
        settings: Settings,
        *,
        guard: Guard,
        breaker: CircuitBreaker,
        monitor: Monitor,
        slot: ModelSlot,
        fallback: BatchClassifier | None,
    ) -> None:
        """Wire the parts; nothing is loaded here."""
        self.settings = settings
        self.serving = settings.serving
        self.guard = guard
        self.breaker = breaker
        self.monitor = monitor
        self.slot = slot
        self.fallback = fallback
        self.fallback_tag = None if fallback is None else ModelTag(fallback.name, fallback.profile, fallback.version)
        self.times = StageTimes()
        # latencies of texts the model answered: the spike check must not learn its baseline from degraded
        # answers or rejections, which take milliseconds
        self._model_latencies: deque[float] = deque(maxlen=settings.reliability.recovery.latency_window)
        self._latencies_generation = 0  # the RecoveryManager generation the latencies were measured on
        self._latencies_lock = threading.Lock()
        self.queue_depth: Callable[[], int] | None = None
        """How many texts wait for the model (set by whoever feeds the pipeline: the service's batcher)."""

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self, text: str) -> str:
        """The text when classifiable, else InvalidInputError (empty, too long, control characters)."""
        return validate_text(text, self.serving.max_text_chars)

    def validation_error(self, text: object) -> ItemError | None:
        """The validation problem of one batch entry as an ItemError (a JSON value that is not a string, or a
        text :meth:`validate` refuses), or None."""
        if not isinstance(text, str):  # its value is not quoted back: it may hold anything, PII too
            return ItemError("invalid_input", f"this entry is {json_type(text)}, not a string: send each text as a "
                             "JSON string", 422)
        try:
            self.validate(text)
        except InvalidInputError as exc:
            return ItemError("invalid_input", str(exc), 422)
        return None

    @property
    def degraded_available(self) -> bool:
        """Whether a degraded answer is possible."""
        return self.serving.degraded_mode == "baseline" and self.fallback is not None

    # ---- the batch path (worker thread) --------------------------------------------------------------------
    def process_batch(self, texts: list[str]) -> list[ItemOutcome]:
        """Guard, classify and check a batch of already validated texts; one outcome per text."""
        started = time.perf_counter()
        try:
            guarded = self.guard.redact_batch(texts)
        except Exception as exc:  # fail closed: an unguarded text never reaches the model or the logs
            logger.exception("PII guard failed on a batch of %d texts", len(texts))
            error = guard_failed(exc)
            return [ItemOutcome(error=error) for _ in texts]
        guarded_at = time.perf_counter()
        masked = [g.redacted_text for g in guarded]
        predictions, degraded, tag, error = self._predict(masked)
        predicted_at = time.perf_counter()
        if error is not None:
            outcomes = [ItemOutcome(guardrail=g, error=error) for g in guarded]
        else:
            outcomes = [self._checked(g, p, degraded, tag) for g, p in zip(guarded, predictions, strict=True)]
        self._time(len(texts), started, guarded_at, predicted_at)
        for text, outcome in zip(masked, outcomes, strict=True):
            label = outcome.prediction.label if outcome.prediction else None
            logger.debug("classified %r -> %s (degraded %s)", text[:120], label, degraded)
        return outcomes

    def _time(self, n: int, started: float, guarded_at: float, predicted_at: float) -> None:
        """Add one batch's step durations to :attr:`times` (one worker thread writes them)."""
        t = self.times
        t.guard_s += guarded_at - started
        t.model_s += predicted_at - guarded_at
        t.checks_s += time.perf_counter() - predicted_at
        t.batches += 1
        t.texts += n

    def _predict(self, masked: list[str]) -> tuple[list[Prediction], bool, ModelTag | None, ItemError | None]:
        """The model's predictions, else the baseline's (degraded), else an error for every item."""
        reason = "model_not_ready"
        if self.slot.ready:
            try:
                predictions = self.slot.classify(masked)
                self._check_latency(len(masked))
                return predictions, False, self.slot.tag, None
            except CircuitOpenError:
                reason = "breaker_open"
            except Exception as exc:  # the model failed: the breaker has counted it; answer degraded or fail
                reason = "model_error"
                logger.warning("model call failed on %d texts: %s: %s", len(masked), type(exc).__name__, exc)
        return self._degraded(masked, reason)

    def _degraded(
        self, masked: list[str], reason: str
    ) -> tuple[list[Prediction], bool, ModelTag | None, ItemError | None]:
        """The baseline's answer, or a 503 error when the degraded mode is off or fails too."""
        retry = max(1.0, round(self.breaker.retry_after_s()))
        if self.degraded_available:
            assert self.fallback is not None
            try:
                predictions = self.fallback.classify(masked)
            except Exception as exc:  # the baseline failing too leaves only the error
                logger.exception("degraded baseline failed: %s", exc)
            else:
                for _ in masked:
                    self.monitor.record_fallback(reason)
                return predictions, True, self.fallback_tag, None
        message = {
            "model_not_ready": _NOT_READY.get(self.slot.status, "the model is not ready"),
            "breaker_open": "the model failed repeatedly and its circuit breaker is open",
            "model_error": "the model failed on this batch",
        }[reason]
        hint = "" if self.degraded_available else " (the degraded mode is off or has no baseline)"
        return [], False, None, ItemError("model_unavailable", f"{message}{hint}; retry later", 503, retry)

    def _checked(self, guarded: GuardrailResult, p: Prediction, degraded: bool, tag: ModelTag | None) -> ItemOutcome:
        """Apply the output checks; an invalid label, or a score that is not a probability, becomes an error."""
        clean = probabilities_or_none(p)
        checked = self.guard.check_output(guarded, p.label, clean.confidence if clean else 0.0)
        if checked.invalid_label or p.label not in LABELS:
            error = ItemError("invalid_label", "the model produced a label outside negative/neutral/positive", 502)
        elif clean is None:
            error = ItemError("invalid_output", "the model produced a score that is not a probability (NaN, "
                              "infinite or outside 0..1)", 502)
        else:
            return ItemOutcome(prediction=clean, guardrail=checked, degraded=degraded, model=tag)
        return ItemOutcome(guardrail=checked, error=error, degraded=degraded, model=tag)

    def _check_latency(self, batch_size: int) -> None:
        """Let the RecoveryManager look for a latency spike in the model-answered latencies (it logs one
        diagnostic per episode, with the queue depth and batch size)."""
        recovery = self.slot.recovery
        if recovery is not None:
            with self._latencies_lock:
                if recovery.generation != self._latencies_generation:  # a reloaded model: learn its latency anew,
                    self._model_latencies.clear()  # not from the slow spell before the reload (the baseline
                    self._latencies_generation = recovery.generation  # is relearned from the next full window)
                latencies = list(self._model_latencies)
            depth = self.queue_depth() if self.queue_depth is not None else None
            recovery.check_latency(latencies, queue_depth=depth, batch_size=batch_size)

    # ---- after the batch (event loop or CLI) ---------------------------------------------------------------
    def record(self, outcome: ItemOutcome, latency_s: float) -> None:
        """Record one item in the monitor: latency, label (model answers only), server error, masked PII.

        A client's mistake (a 4xx such as invalid input) is not recorded: it says nothing of the service's health.
        """
        if outcome.error is not None and outcome.error.status < 500:
            return
        g = outcome.guardrail
        if g is not None and g.pii_detected:
            for entity, count in (g.pii_counts or dict.fromkeys(g.pii_types, 1)).items():
                self.monitor.record_pii(entity, count)
        if outcome.error is not None:
            self.monitor.record(latency_s, error=outcome.error.code)
        else:
            label = None if outcome.degraded or outcome.prediction is None else outcome.prediction.label
            self.monitor.record(latency_s, label=label)
            if label is not None:
                with self._latencies_lock:
                    self._model_latencies.append(latency_s)

    def classify_offline(self, texts: list[str]) -> list[ItemOutcome]:
        """The whole pipeline for texts in this thread (the CLI): validation errors become error outcomes."""
        started = time.perf_counter()
        errors = [self.validation_error(t) for t in texts]
        valid = [t for t, e in zip(texts, errors, strict=True) if e is None]
        processed = iter(self.process_batch(valid) if valid else [])
        outcomes = [ItemOutcome(error=e) if e is not None else next(processed) for e in errors]
        latency = time.perf_counter() - started
        for outcome in outcomes:
            self.record(outcome, latency)
        return outcomes

    def breaker_state(self) -> str:
        """The breaker's state name."""
        return BreakerState(self.breaker.state).value

    def describe(self) -> dict[str, Any]:
        """Model, breaker and degraded-mode state for /readyz and /metrics/json."""
        return {
            "model": self.slot.status,
            "model_error": self.slot.error,
            "breaker": self.breaker.snapshot(),
            "degraded_mode": self.serving.degraded_mode,
            "degraded_available": self.degraded_available,
            "stage_seconds": self.times.as_dict(),
            "latency_baseline_p95_s": None if self.slot.recovery is None else self.slot.recovery.latency_baseline_p95_s,
            "faults": self.slot.faults_seen(),
        }


def json_type(value: object) -> str:
    """The JSON type of a parsed JSON value, with its article ("a number", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {list: "an array", dict: "an object"}.get(type(value), f"a {type(value).__name__}")
