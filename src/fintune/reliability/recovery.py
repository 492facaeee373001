"""Automatic recovery: handlers for out-of-memory errors, latency spikes and prediction drift.

:class:`RecoveryManager` holds the live model and a loader callback that builds a new one. It handles three
events without a human:

* **Out of memory** — ``torch.cuda.OutOfMemoryError`` (``torch.OutOfMemoryError``), ``MemoryError`` and any
  ``RuntimeError`` whose message says "out of memory" (CUDA, MPS) or "can't allocate memory" (torch's CPU
  allocator). The manager drops the model, frees memory (``gc.collect()``, plus ``torch.cuda.empty_cache()``
  when torch is already imported and CUDA is available; torch is never imported here), then calls the loader
  up to ``oom_max_attempts`` times (default 3), waiting ``oom_backoff_s`` (1 s) before the second attempt and
  ``oom_backoff_factor`` (2x) longer before each later one, capped at ``oom_backoff_max_s`` (30 s). When every
  attempt fails it trips the circuit breaker (so requests are rejected fast instead of reaching a dead model)
  and reports the failure. Concurrent OOMs from several threads trigger one reload, successful or not. The
  failing call's frames are cleared first, so the old model is really gone before the new one loads. After a
  failed reload the next attempt comes with the breaker's HALF_OPEN trial (loaded before the trial call, so
  loading time never counts as a slow call), or, without a breaker, at most once per ``oom_backoff_max_s``.
* **Latency spike** — :meth:`RecoveryManager.check_latency` takes the recent latencies; once at least
  ``latency_min_samples`` are there, a p95 above ``latency_spike_p95_s`` (2 s) or above
  ``latency_spike_multiple`` (3x) the baseline p95 (``latency_baseline_p95_s``, or learned from the first full
  window) is a spike. It logs ONE diagnostic snapshot per spike episode (process RSS, CUDA memory when present,
  queue depth, batch size, the recent latencies, breaker state; never request text) and again only after the
  p95 went back under the limit.
* **Drift** — :meth:`RecoveryManager.handle_drift` calls every registered hook with the drift report; a hook
  that raises is logged and the others still run, and nothing is raised to the request path.

Every outcome is a :class:`RecoveryOutcome`, logged, kept in :attr:`RecoveryManager.history` and given to
the ``on_outcome`` listeners. Sleeping and the clock are injectable so tests never wait.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from fintune.config import RecoverySettings
from fintune.errors import RecoveryError
from fintune.reliability.breaker import BreakerState, CircuitBreaker

__all__ = ["RecoveryManager", "RecoveryOutcome", "free_memory", "is_out_of_memory"]

log = logging.getLogger(__name__)
M = TypeVar("M")
R = TypeVar("R")
OOM_MESSAGES = ("out of memory", "can't allocate memory")
HISTORY_SIZE = 1000  # outcomes kept in RecoveryManager.history


@dataclass(frozen=True)
class RecoveryOutcome:
    """What one recovery did: the event, whether it worked, how many attempts, and details."""

    event: str
    succeeded: bool
    attempts: int = 0
    duration_s: float = 0.0
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (torch OOM, MemoryError, RuntimeError saying so)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def free_memory() -> dict[str, Any]:
    """Run the garbage collector and empty torch's CUDA cache when CUDA is there; returns what was done."""
    done: dict[str, Any] = {"gc_collected": gc.collect()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        done["cuda_cache_emptied"] = True
    return done


def _process_memory() -> dict[str, Any]:
    """Resident memory of this process and, when CUDA is there, torch's allocated/reserved bytes."""
    import psutil

    memory: dict[str, Any] = {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        memory["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        memory["cuda_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    return memory


def backoff_delay(settings: RecoverySettings, retry: int) -> float:
    """Seconds to wait before retry number ``retry`` of a load (0: the first attempt, no wait): ``oom_backoff_s``,
    growing by ``oom_backoff_factor`` each retry, at most ``oom_backoff_max_s``."""
    if retry == 0:
        return 0.0
    return min(settings.oom_backoff_s * settings.oom_backoff_factor ** (retry - 1), settings.oom_backoff_max_s)


class RecoveryManager(Generic[M]):
    """Holds the live model, reloads it after out-of-memory errors, watches latency and dispatches drift."""

    def __init__(
        self,
        loader: Callable[[], M],
        settings: RecoverySettings | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        model: M | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        reload_in_background: bool = False,
    ) -> None:
        """Load models with ``loader`` (on first use, unless ``model`` is given) and run calls through ``breaker``,
        tripping it when a reload fails; ``sleep`` and ``clock`` time the backoff (injected in tests).
        ``reload_in_background``: after out-of-memory, reload in a thread of its own; calls meanwhile fail fast
        with RecoveryError (outside the breaker) instead of waiting for the reload."""
        self.loader = loader
        self.settings = settings or RecoverySettings()
        self.breaker = breaker
        self.sleep = sleep
        self.clock = clock
        self.history: deque[RecoveryOutcome] = deque(maxlen=HISTORY_SIZE)
        self._model: M | None = model
        self._generation = 0  # bumped by every reload, failed or not
        self._failed_at: float | None = None  # when the last reload failed (None: it succeeded)
        self._reload_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._drift_hooks: list[Callable[[Any], None]] = []
        self._outcome_listeners: list[Callable[[RecoveryOutcome], None]] = []
        self._latency_baseline = self.settings.latency_baseline_p95_s
        self._in_spike = False
        self._background = reload_in_background
        self._reloading = threading.Event()  # a background reload is running

    # ---- the model ----------------------------------------------------------------------------------------
    @property
    def model(self) -> M:
        """The live model, loaded on first use; RecoveryError when the last reload failed and no retry is due, or
        while a background reload runs."""
        if self._model is None and not self._reloading.is_set() and self._retry_due():
            generation = self._generation
            with self._reload_lock:
                # nobody tried meanwhile, and no reload runs (checked under the lock: one reload at a time)
                if self._model is None and generation == self._generation and not self._reloading.is_set():
                    if self._background and self._failed_at is not None:  # never in the caller's thread
                        self._reload_aside("load after a failed reload", event="reload")
                    else:
                        self._reload("load after a failed reload" if self.history else "initial load",
                                     event="reload")
        if self._reloading.is_set():
            raise RecoveryError("the model is being reloaded in the background; retry shortly")
        if self._model is None:
            raise RecoveryError("the model is not loaded: the last reload failed; see the recovery log")
        return self._model

    @property
    def generation(self) -> int:
        """How many reloads have run (failed ones too): latencies measured under another generation were
        measured on another model."""
        return self._generation

    @property
    def reloading(self) -> bool:
        """Whether a background reload is under way (the model is then not there)."""
        return self._reloading.is_set()

    def _retry_due(self) -> bool:
        """Whether a missing model may be loaded now: a breaker of this process's own gates retries; without one,
        or with one shared by other processes, one retry per backoff cap."""
        if self._failed_at is None or self._breaker_is_ours():
            return True
        return self.clock() - self._failed_at >= self.settings.oom_backoff_max_s

    def _breaker_is_ours(self) -> bool:
        """Whether there is a breaker and only this process uses it. A shared breaker (Redis) speaks for every
        worker: one worker's failed reload must neither open it nor have that worker's missing model count as the
        fleet's failures."""
        return self.breaker is not None and not self.breaker.storage.shared

    def call(self, fn: Callable[[M], R]) -> R:
        """Run ``fn(model)`` (through the breaker when there is one); on OOM recover, then re-raise.

        The failing request still fails (its error is re-raised); the next one runs on the reloaded model.
        """

        def run() -> R:
            """One guarded call on the live model; OOM starts recovery before the error propagates."""
            model = self.model
            generation = self._generation
            try:
                return fn(model)
            except BaseException as exc:
                if is_out_of_memory(exc):
                    del model
                    traceback.clear_frames(exc.__traceback__)  # fn's frames still hold the old model
                    self.handle_oom(exc, generation)
                raise

        if self.breaker is None:
            return run()
        if self._model is None and self._breaker_is_ours() and self.breaker.state is not BreakerState.OPEN:
            self._load_quietly()  # outside the breaker: loading is not the (possibly slow-limited) trial call
        if self._reloading.is_set() or not self._breaker_is_ours():
            # a reload under way, or a model missing in this process under the fleet's breaker: RecoveryError here,
            # outside the breaker, which must not count it as the model failing
            self.model  # noqa: B018
        return self.breaker.call(run)

    def _load_quietly(self) -> None:
        """Load a missing model; a failure is already reported and has tripped the breaker."""
        with contextlib.suppress(RecoveryError):
            self.model  # noqa: B018

    def handle_oom(self, exc: BaseException, generation: int | None = None) -> RecoveryOutcome:
        """Free memory and reload the model with backoff; trip the breaker when every attempt fails.

        ``generation`` is the model generation the failing call used: if another thread already reloaded
        since, nothing is done again.
        """
        reason = f"out of memory: {type(exc).__name__}"
        with self._reload_lock:
            if self._reloading.is_set():  # another call's out-of-memory started it (checked under the lock)
                return RecoveryOutcome("out_of_memory", False, details={"already_reloading": True})
            if generation is not None and generation != self._generation:
                handled = RecoveryOutcome("out_of_memory", self._model is not None, details={"already_reloaded": True})
                return self._report(handled)
            log.warning("out of memory (%s): freeing memory and reloading the model%s", type(exc).__name__,
                        " in the background" if self._background else "")
            if not self._background:
                return self._reload(reason, event="out_of_memory")
            self._reload_aside(reason, event="out_of_memory")
        return RecoveryOutcome("out_of_memory", False, details={"reloading_in_background": True})

    def _reload_aside(self, reason: str, *, event: str) -> None:
        """Start the background reload (the reload lock is held): the model goes now, calls fail fast with
        RecoveryError until the new one is in, and a second reload cannot start meanwhile."""
        self._model = None
        self._reloading.set()
        threading.Thread(target=self._reload_then_resume, args=(reason, event), name="fintune-model-reload",
                         daemon=True).start()

    def _reload_then_resume(self, reason: str, event: str) -> None:
        """The background reload (reported as any reload is); calls are let through again when it ends."""
        try:
            with self._reload_lock:
                self._reload(reason, event=event)
        finally:
            self._reloading.clear()

    def reload(self, reason: str = "requested") -> RecoveryOutcome:
        """Drop the model, free memory and load a new one with backoff (one reload at a time)."""
        with self._reload_lock:
            return self._reload(reason, event="reload")

    def _reload(self, reason: str, *, event: str) -> RecoveryOutcome:
        """Reload with retries; the reload lock is held."""
        start = self.clock()
        self._model = None
        freed = free_memory()
        attempts, last_error = 0, None
        for delay in self._delays():
            if delay:
                self.sleep(delay)
            attempts += 1
            try:
                self._model = self.loader()
            except Exception as exc:  # the loader may fail in any way; we retry and report it
                last_error = f"{type(exc).__name__}: {exc}"
                log.warning("reload attempt %d/%d failed: %s", attempts, self.settings.oom_max_attempts,
                            last_error)
                del exc
                free_memory()
                continue
            self._generation += 1
            self._failed_at = None
            with self._state_lock:  # a new model: learn its latency again
                self._latency_baseline, self._in_spike = self.settings.latency_baseline_p95_s, False
            details = {"reason": reason, "freed": freed, "generation": self._generation}
            return self._report(RecoveryOutcome(event, True, attempts, self.clock() - start, None, details))
        self._generation += 1  # threads that failed on the old model must not reload again
        self._failed_at = self.clock()
        if self._breaker_is_ours():
            self.breaker.trip(f"model reload failed {attempts} time(s)")  # type: ignore[union-attr]
        details = {"reason": reason, "freed": freed, "breaker_tripped": self._breaker_is_ours()}
        return self._report(RecoveryOutcome(event, False, attempts, self.clock() - start, last_error, details))

    def _delays(self) -> list[float]:
        """Wait before each attempt: 0, then backoff, growing by the factor, capped."""
        return [backoff_delay(self.settings, retry) for retry in range(self.settings.oom_max_attempts)]

    # ---- latency spikes -----------------------------------------------------------------------------------
    @property
    def latency_baseline_p95_s(self) -> float | None:
        """The p95 a spike is judged against: configured, or learned from the first full window (None until)."""
        return self._latency_baseline

    def check_latency(
        self, latencies_s: Sequence[float], *, queue_depth: int | None = None, batch_size: int | None = None
    ) -> RecoveryOutcome | None:
        """Judge the recent latencies; on the first check of a spike episode log one diagnostic snapshot."""
        s = self.settings
        window = list(latencies_s)[-s.latency_window :]
        if len(window) < s.latency_min_samples:
            return None
        p95 = float(np.percentile(window, 95))
        with self._state_lock:
            if self._latency_baseline is None and len(window) >= s.latency_window:
                self._latency_baseline = p95
            limit = self._spike_limit()
            spiking = p95 > limit
            starts = spiking and not self._in_spike
            self._in_spike = spiking
        if not starts:
            return None
        snapshot = self._diagnostics(window, p95, limit, queue_depth, batch_size)
        log.warning("latency spike: %s", json.dumps(snapshot, sort_keys=True))
        return self._report(RecoveryOutcome("latency_spike", True, details=snapshot))

    def _spike_limit(self) -> float:
        """The p95 above which latency is a spike: the absolute limit or the baseline multiple, the lower."""
        limit = self.settings.latency_spike_p95_s
        if self._latency_baseline is not None:
            limit = min(limit, self._latency_baseline * self.settings.latency_spike_multiple)
        return limit

    def _diagnostics(
        self, window: list[float], p95: float, limit: float, queue_depth: int | None, batch_size: int | None
    ) -> dict[str, Any]:
        """The one diagnostic snapshot of a spike: numbers only, never request text."""
        return {
            "p95_s": round(p95, 4),
            "limit_s": round(limit, 4),
            "baseline_p95_s": self._latency_baseline,
            "memory": _process_memory(),
            "queue_depth": queue_depth,
            "batch_size": batch_size,
            "recent_latencies_s": [round(x, 4) for x in window[-20:]],
            "breaker": self.breaker.snapshot() if self.breaker is not None else None,
        }

    # ---- drift --------------------------------------------------------------------------------------------
    def add_drift_hook(self, hook: Callable[[Any], None]) -> None:
        """Register a sync callable that receives the drift report when drift starts."""
        self._drift_hooks.append(hook)

    def handle_drift(self, report: Any) -> RecoveryOutcome:
        """Call every drift hook with ``report``; a hook that raises is logged and the rest still run."""
        failed: list[str] = []
        for hook in list(self._drift_hooks):
            try:
                hook(report)
            except Exception:
                log.exception("drift hook %r failed", hook)
                failed.append(getattr(hook, "__name__", repr(hook)))
        details = {"hooks": len(self._drift_hooks), "failed_hooks": failed}
        return self._report(RecoveryOutcome("drift", not failed, len(self._drift_hooks), details=details))

    # ---- reporting ----------------------------------------------------------------------------------------
    def on_outcome(self, listener: Callable[[RecoveryOutcome], None]) -> None:
        """Call ``listener(outcome)`` after every recovery action."""
        self._outcome_listeners.append(listener)

    def _report(self, outcome: RecoveryOutcome) -> RecoveryOutcome:
        """Log, keep and broadcast an outcome."""
        level = logging.INFO if outcome.succeeded else logging.ERROR
        log.log(level, "recovery %s: %s", outcome.event, "succeeded" if outcome.succeeded else "FAILED")
        with self._state_lock:
            self.history.append(outcome)
        for listener in list(self._outcome_listeners):
            try:
                listener(outcome)
            except Exception:
                log.exception("recovery listener %r failed", listener)
        return outcome

    def outcomes(self, event: str | None = None) -> list[RecoveryOutcome]:
        """Outcomes so far, optionally of one event kind."""
        with self._state_lock:
            return [o for o in self.history if event is None or o.event == event]

    def summary(self) -> Mapping[str, Any]:
        """Counts of outcomes by event and result, for /metrics."""
        counts: dict[str, int] = {}
        for o in self.outcomes():
            key = f"{o.event}:{'ok' if o.succeeded else 'failed'}"
            counts[key] = counts.get(key, 0) + 1
        return counts
