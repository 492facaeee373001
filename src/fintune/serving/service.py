"""The service's parts held together: built by the app factory, started and stopped by its lifespan.

:class:`Services` owns the guard, breaker, monitor, model slot, degraded-mode baseline, pipeline and
micro-batcher of one app, and the three request operations the routers call (:meth:`Services.classify`,
:meth:`Services.classify_batch`, :meth:`Services.analyze`): validate, submit to the batcher, record in the
monitor, and turn outcomes into response bodies. Routers stay thin; everything here is testable in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fintune.config import Settings
from fintune.errors import ArtifactError, FinTuneError, InvalidInputError, ServiceOverloadedError
from fintune.monitoring import BASELINE_FILENAME, SystemMonitor, load_drift_baseline
from fintune.reliability import CircuitBreaker, backoff_delay
from fintune.serving import documents
from fintune.serving.batching import MicroBatcher
from fintune.serving.model_adapter import BatchClassifier, load_baseline, load_classifier, model_dir
from fintune.serving.pipeline import (
    ClassificationPipeline,
    Guard,
    ItemError,
    ItemOutcome,
    ModelSlot,
    check_characters,
    guard_failed,
)
from fintune.serving.security import ApiKeyChecker

logger = logging.getLogger(__name__)
AUTO: Literal["auto"] = "auto"
"""Build this part from the settings at start-up."""
ClassifierSource = BatchClassifier | Callable[[], BatchClassifier] | None


class ItemFailedError(FinTuneError):
    """A single-text request whose item ended in an error (mapped to the item's HTTP status)."""

    def __init__(self, error: ItemError) -> None:
        self.error = error
        super().__init__(error.message)


@dataclass
class Services:
    """Everything one app instance serves with."""

    settings: Settings
    classifier: ClassifierSource
    guard: Guard | None
    breaker: CircuitBreaker
    monitor: SystemMonitor
    fallback: BatchClassifier | None | Literal["auto"]
    pipeline: ClassificationPipeline | None = None
    batcher: MicroBatcher[str, ItemOutcome] | None = None
    api_key: ApiKeyChecker | None = None
    _model_task: asyncio.Task[None] | None = None
    _first_load_done: asyncio.Event = field(default_factory=asyncio.Event)
    _uninstall_redaction: Callable[[], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the guard and the baseline, start the batcher, and load the model in the background."""
        self.api_key = ApiKeyChecker(self.settings.serving.api_key)
        if self.guard is None:
            from fintune.guardrails import PIIGuard

            self.guard = await asyncio.to_thread(PIIGuard.from_settings, self.settings.guardrails)
        self._install_log_redaction()
        if self.fallback == AUTO:
            self.fallback = await asyncio.to_thread(load_baseline, self.settings)
        slot = ModelSlot(model_loader(self.settings, self.classifier), self.settings, self.breaker,
                         reload_in_background=self.settings.reliability.recovery.reload_in_background)
        self.breaker.add_listener(self.monitor.on_breaker_transition)
        self.monitor.set_breaker_state(self.breaker.state.value)
        self.pipeline = ClassificationPipeline(
            self.settings, guard=self.guard, breaker=self.breaker, monitor=self.monitor, slot=slot,
            fallback=self.fallback,
        )
        s = self.settings.serving
        self.batcher = batcher = MicroBatcher(
            self.pipeline.process_batch, max_batch_size=s.micro_batch_size, max_wait_ms=s.micro_batch_wait_ms,
            max_queue=s.queue_size,
        )
        self.pipeline.queue_depth = lambda: batcher.depth
        await batcher.start()
        self._model_task = asyncio.create_task(self._load_model(slot), name="fintune-model-load")

    async def stop(self) -> None:
        """Finish every queued item, then stop the batcher and undo the log redaction; a model load still
        running is abandoned (its daemon thread never holds the process)."""
        if self._model_task is not None and not self._model_task.done():
            self._model_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._model_task
        if self.batcher is not None:
            await self.batcher.stop()
        if self._uninstall_redaction is not None:
            self._uninstall_redaction()
            self._uninstall_redaction = None
        logger.info("service stopped")

    def _install_log_redaction(self) -> None:
        """Redact every log record from now on, when the settings ask for it and the guard can."""
        if self.settings.guardrails.redact_logs and hasattr(self.guard, "analyzer"):
            from fintune.guardrails import install_log_redaction

            self._uninstall_redaction = install_log_redaction(self.guard)  # type: ignore[arg-type]

    async def _load_model(self, slot: ModelSlot) -> None:
        """Load the model off the event loop, and again with backoff while that fails (a transient failure at
        boot, out of memory say, must not leave the service not ready for good; meanwhile it answers degraded);
        then wire drift detection when a baseline file exists."""
        for attempt in itertools.count():
            if attempt:
                delay = backoff_delay(self.settings.reliability.recovery, attempt)
                logger.warning("model load failed (%s); trying again in %.1f s", slot.error, delay)
                await asyncio.sleep(delay)
            await in_daemon_thread(slot.load, "fintune-model-load")
            self._first_load_done.set()
            if slot.ready:
                break
        if slot.recovery is not None:
            self.monitor.on_drift(slot.recovery.handle_drift)
            self._add_drift_webhook(slot)
            folder = model_dir(self.settings)
            try:
                self.monitor.set_drift_baseline(load_drift_baseline(folder))
            except (FinTuneError, OSError, ValueError) as exc:  # a file that is there but unusable is a warning
                level = logging.WARNING if (folder / BASELINE_FILENAME).exists() else logging.INFO
                logger.log(level, "no drift baseline (%s): drift detection is off", exc)

    def _add_drift_webhook(self, slot: ModelSlot) -> None:
        """Register the drift webhook as a recovery drift hook when ``monitoring.drift_webhook_url`` is set."""
        m = self.settings.monitoring
        if m.drift_webhook_url is None or slot.recovery is None:
            return
        from fintune.serving.alerts import DriftWebhook

        tag = slot.tag
        service = {"profile": self.settings.profile, "model": tag.name if tag else None,
                   "version": tag.version if tag else None}
        slot.recovery.add_drift_hook(DriftWebhook(m.drift_webhook_url.get_secret_value(), m.drift_webhook_timeout_s,
                                                  service))

    def current_monitor(self) -> SystemMonitor:
        """The monitor, told the breaker's state as it is now (a shared breaker may have been moved by another
        process, whose transitions this process's listeners never hear)."""
        self.monitor.set_breaker_state(self.breaker.state.value)
        return self.monitor

    async def wait_until_loaded(self) -> None:
        """Return once the first background model load has finished (ready, or failed and to be retried)."""
        if self._model_task is not None:
            await self._first_load_done.wait()

    # ---- requests ------------------------------------------------------------------------------------------
    def _parts(self) -> tuple[ClassificationPipeline, MicroBatcher[str, ItemOutcome]]:
        """The started pipeline and batcher."""
        if self.pipeline is None or self.batcher is None:
            raise ServiceOverloadedError(0, 0, 1.0)
        return self.pipeline, self.batcher

    async def _submit(self, texts: list[str], started: float) -> list[ItemOutcome]:
        """Submit validated texts; an overload is recorded in the monitor and re-raised."""
        pipeline, batcher = self._parts()
        try:
            return await batcher.submit_many(texts)
        except ServiceOverloadedError:
            self.monitor.record(time.perf_counter() - started, error="overloaded")
            raise

    async def classify(self, text: str) -> dict[str, Any]:
        """One text: its classification (ItemFailedError when it has none)."""
        started = time.perf_counter()
        pipeline, _ = self._parts()
        pipeline.validate(text)
        outcome = (await self._submit([text], started))[0]
        latency = time.perf_counter() - started
        if outcome.error is not None:
            pipeline.record(outcome, latency)
            raise ItemFailedError(outcome.error)
        answer = {**classification(outcome), "latency_ms": round(latency * 1000, 3)}
        pipeline.record(outcome, latency)  # last: an error building the answer is then counted once, as a 500
        return answer

    async def classify_batch(self, texts: Sequence[object]) -> dict[str, Any]:
        """Several texts: one entry per text in order; bad texts, and entries that are not strings, get their own
        error."""
        started = time.perf_counter()
        pipeline, _ = self._parts()
        limit = self.settings.serving.max_batch_items
        if not texts:
            raise InvalidInputError(f"texts is empty: send 1 to {limit} texts")
        if len(texts) > limit:
            raise InvalidInputError(
                f"texts holds {len(texts)} items, more than the limit of {limit} (serving.max_batch_items): "
                "split the batch"
            )
        errors = [pipeline.validation_error(t) for t in texts]
        valid = [t for t, e in zip(texts, errors, strict=True) if e is None and isinstance(t, str)]
        processed = iter(await self._submit(valid, started) if valid else [])
        outcomes = [ItemOutcome(error=e) if e is not None else next(processed) for e in errors]
        latency = time.perf_counter() - started
        answer = {
            "results": [batch_item(i, o) for i, o in enumerate(outcomes)],
            "errors": sum(o.error is not None for o in outcomes),
            "degraded": sum(o.degraded and o.error is None for o in outcomes),
            "latency_ms": round(latency * 1000, 3),
        }
        for outcome in outcomes:  # last: an error building the answer is then counted once, as a 500
            pipeline.record(outcome, latency)
        _raise_if_all_unavailable(outcomes)
        return answer

    async def analyze(self, document: str) -> dict[str, Any]:
        """A document: per-sentence results (redacted), the sentences that failed and why, and the aggregate."""
        started = time.perf_counter()
        pipeline, _ = self._parts()
        s = self.settings.serving
        if len(document) > s.max_document_chars or documents.is_blank(document):
            documents.check_document(document, s.max_document_chars, s.max_document_sentences, [])
        check_characters(document, "document")  # positions in the document; spaCy never sees a lone surrogate
        try:
            masked, masks = await asyncio.to_thread(_mask_document, pipeline, document)
            sentences = await asyncio.to_thread(documents.split_sentences, masked)
            documents.check_document(document, s.max_document_chars, s.max_document_sentences, sentences)
            pieces = await asyncio.to_thread(_fit_sentences, pipeline, sentences, s.max_text_chars)
        except ItemFailedError as exc:  # the guard failed: a server error the monitor counts, as for classify
            pipeline.record(ItemOutcome(error=exc.error), time.perf_counter() - started)
            raise
        sentences, cut = [text for text, _ in pieces], [was_cut for _, was_cut in pieces]
        documents.check_document(document, s.max_document_chars, s.max_document_sentences, sentences, sum(cut))
        for sentence in sentences:
            pipeline.validate(sentence)
        outcomes = await self._submit(sentences, started)
        outcomes = [with_document_pii(outcome, types)
                    for outcome, types in zip(outcomes, documents.masks_in_pieces(masked, sentences, masks),
                                              strict=True)]
        latency = time.perf_counter() - started
        failed = [{"index": i, "error": error_info(o.error)} for i, o in enumerate(outcomes) if o.error is not None]
        results = [sentence_result(i, o, cut[i]) for i, o in enumerate(outcomes) if o.error is None]
        answer = {
            "aggregate": documents.aggregate(results),
            "results": results,
            "failed": failed,
            "latency_ms": round(latency * 1000, 3),
        }
        for outcome in outcomes:  # last: an error building the answer is then counted once, as a 500
            pipeline.record(outcome, latency)
        if not results:  # nothing to aggregate: the request fails with the first reason
            assert outcomes[0].error is not None
            raise ItemFailedError(outcomes[0].error)
        return answer


async def in_daemon_thread(fn: Callable[[], None], name: str) -> None:
    """Await ``fn()`` run in a daemon thread: unlike ``asyncio.to_thread``, whose executor the event loop waits
    for when it closes, a shutdown during a long model load does not wait for the load."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_result(None) if error is None else done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done


def _mask_document(pipeline: ClassificationPipeline, document: str) -> tuple[str, list[documents.Mask]]:
    """The document with its PII masked, found with the whole document as context, and where each mask sits."""
    try:
        spans = pipeline.guard.detect(document)
    except Exception as exc:  # fail closed, as the batch path does
        logger.exception("PII guard failed on a document of %d characters", len(document))
        raise ItemFailedError(guard_failed(exc)) from None
    return pipeline.guard.mask(document, spans).redacted_text, documents.masks_after_masking(spans)


def with_document_pii(outcome: ItemOutcome, types: list[str]) -> ItemOutcome:
    """``outcome`` whose guardrail record also counts the PII masked in its text before the document was split."""
    g = outcome.guardrail
    if g is None or not types:
        return outcome
    counts = Counter(g.pii_counts) + Counter(types)
    merged = g.model_copy(update={"pii_detected": True, "pii_types": sorted(counts), "pii_count": sum(counts.values()),
                                  "pii_counts": dict(sorted(counts.items()))})
    return dataclasses.replace(outcome, guardrail=merged)


def _fit_sentences(pipeline: ClassificationPipeline, sentences: list[str], max_chars: int) -> list[tuple[str, bool]]:
    """Each text to classify and whether it is a piece of a longer sentence: sentences over the per-text limit
    come in pieces cut outside the PII spans the guard finds in them (fails closed)."""
    long = [i for i, sentence in enumerate(sentences) if len(sentence) > max_chars]
    try:
        spans = pipeline.guard.detect_batch([sentences[i] for i in long]) if long else []
    except Exception as exc:  # fail closed, as the batch path does: no sentence is cut blind
        logger.exception("PII guard failed on %d over-long sentences", len(long))
        raise ItemFailedError(guard_failed(exc)) from None
    found = dict(zip(long, spans, strict=True))
    fitted: list[tuple[str, bool]] = []
    for i, sentence in enumerate(sentences):
        if i in found:
            fitted += [(piece, True) for piece in documents.split_long(sentence, max_chars, found[i])]
        else:
            fitted.append((sentence, False))
    return fitted


def _raise_if_all_unavailable(outcomes: list[ItemOutcome]) -> None:
    """Fail the whole request (503) when every item failed because the model is unavailable."""
    errors = [o.error for o in outcomes]
    if errors and all(e is not None and e.code == "model_unavailable" for e in errors):
        assert errors[0] is not None
        raise ItemFailedError(errors[0])


def error_info(error: ItemError) -> dict[str, Any]:
    """An ItemError as the ErrorInfo body."""
    return {"code": error.code, "message": error.message, "retry_after_s": error.retry_after_s}


def classification(outcome: ItemOutcome) -> dict[str, Any]:
    """A successful outcome as the Classification body."""
    assert outcome.prediction is not None and outcome.guardrail is not None and outcome.model is not None
    p, m = outcome.prediction, outcome.model
    return {
        "label": p.label,
        "scores": p.scores,
        "confidence": p.confidence,
        "guardrail": outcome.guardrail.model_dump(),
        "degraded": outcome.degraded,
        "model": {"name": m.name, "profile": m.profile, "version": m.version},
    }


def batch_item(index: int, outcome: ItemOutcome) -> dict[str, Any]:
    """One BatchItem body."""
    if outcome.error is not None:
        return {"index": index, "result": None, "error": error_info(outcome.error)}
    return {"index": index, "result": classification(outcome), "error": None}


def sentence_result(index: int, outcome: ItemOutcome, cut: bool = False) -> dict[str, Any]:
    """One SentenceResult body (the sentence as the model saw it: redacted; ``cut``: a piece of a longer one)."""
    assert outcome.prediction is not None and outcome.guardrail is not None
    p, g = outcome.prediction, outcome.guardrail
    return {
        "index": index,
        "text": g.redacted_text,
        "label": p.label,
        "confidence": p.confidence,
        "scores": p.scores,
        "degraded": outcome.degraded,
        "pii_types": g.pii_types,
        "cut": cut,
    }


def model_loader(settings: Settings, source: ClassifierSource) -> Callable[[], BatchClassifier]:
    """What loads (and reloads) the model: the profile's trained model, a given classifier, or a given loader."""
    if source is None:
        return lambda: load_classifier(settings)
    if isinstance(source, BatchClassifier):
        return lambda: source
    return source


def offline_pipeline(settings: Settings, classifier: ClassifierSource = None) -> ClassificationPipeline:
    """The service's pipeline for use in this thread (``fintune classify``): guard, breaker, model, baseline."""
    from fintune.guardrails import PIIGuard

    breaker = CircuitBreaker.from_settings(settings.reliability, scope=settings.profile)
    slot = ModelSlot(model_loader(settings, classifier), settings, breaker)
    slot.load()
    if not slot.ready:  # a service stays up degraded; a batch run must not quietly answer from the baseline
        raise ArtifactError(
            f"the model did not load ({slot.error}); fix serving.model_dir (--model) or retrain it with "
            "`fintune train`"
        )
    fallback = load_baseline(settings) if settings.serving.degraded_mode == "baseline" else None
    return ClassificationPipeline(
        settings, guard=PIIGuard.from_settings(settings.guardrails), breaker=breaker,
        monitor=SystemMonitor(settings.monitoring), slot=slot, fallback=fallback,
    )


@dataclass(frozen=True)
class OfflineRecords:
    """A picklable recipe of the offline pipeline for another process (a Ray actor of ``fintune classify
    --engine ray``): called there, it builds the pipeline and returns a function from texts to records."""

    settings: Settings
    redact_process_logs: bool = True
    """Redact every log record of the process that builds it (a worker's whole process is the pipeline's)."""

    def __call__(self) -> Callable[[list[str]], list[dict[str, Any]]]:
        """Build the pipeline here (loading the model) and return its text-to-records function."""
        return self.in_this_process()[0]

    def in_this_process(self) -> tuple[Callable[[list[str]], list[dict[str, Any]]], Callable[[], None]]:
        """The text-to-records function and what undoes its log redaction when the run ends (a no-op when none
        was installed): for a caller whose process outlives the run."""
        pipeline = offline_pipeline(self.settings)
        undo: Callable[[], None] = lambda: None  # noqa: E731
        if self.redact_process_logs and self.settings.guardrails.redact_logs:
            from fintune.guardrails import install_log_redaction

            undo = install_log_redaction(pipeline.guard)  # type: ignore[arg-type]
        return (lambda texts: [outcome_record(outcome) for outcome in pipeline.classify_offline(texts)]), undo


def outcome_record(outcome: ItemOutcome) -> dict[str, Any]:
    """One outcome as a JSON-ready record (the redacted text only, never the input)."""
    if outcome.error is not None:
        record: dict[str, Any] = {"error": error_info(outcome.error)}
        if outcome.guardrail is not None:
            record["guardrail"] = outcome.guardrail.model_dump()
        return record
    return {**classification(outcome), "error": None}
