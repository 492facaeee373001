"""The circuit breaker: stop calling a failing model, fail fast, and probe it again after a timeout.

The pattern is Michael T. Nygard's (*Release It!*, 2007); the semantics follow resilience4j's
``CircuitBreaker`` and pybreaker's state-object design:

* **CLOSED** — calls run. ``failure_threshold`` consecutive failures (default 5) open the breaker; a success
  resets the streak.
* **OPEN** — calls are rejected at once with :class:`~fintune.errors.CircuitOpenError` (no model call). After
  ``recovery_timeout_s`` (default 30 s) the next call (or a read of :attr:`CircuitBreaker.state`) moves it to
  HALF_OPEN.
* **HALF_OPEN** — ``half_open_max_calls`` trial calls (default 1) are let through, any more are rejected. When
  all of them succeed the breaker closes; the first failure reopens it and restarts the timeout. Trials that
  have not answered within ``recovery_timeout_s`` are given up (their process may have died while holding a
  shared breaker's trial slots): the next call gets fresh trial slots, and the lost trials' late results only
  update the counters.

A *failure* is an exception that is an instance of a counted type (default ``Exception``) and not of an
ignored type (business errors, e.g. invalid input: they mean the model answered, so they count as
successes), or a call that returned but took longer than ``slow_call_limit_s`` (when set; the result is still
returned). ``BaseException``\\ s that are not ``Exception`` (``asyncio.CancelledError``, ``KeyboardInterrupt``)
are neither: the call's slot is released and the exception propagates. A call admitted in one state whose
result arrives after the state changed only updates the counters, never the state (resilience4j's rule too).

Why not pybreaker 1.4.1: it meets none of four requirements here. Its ``call_async`` is Tornado-only (no
asyncio); HALF_OPEN lets every concurrent call through (``success_threshold`` counts successes, it does not
limit trial calls); it has no slow-call rule; and it reads ``datetime.now()`` directly (no injectable clock, so
the timeout cannot be tested without sleeping). It also holds its lock for the whole guarded call, which
serialises all model calls. So this module is ours, with the same shape: one class per state
behind a single state map, pluggable storage (:mod:`fintune.reliability.storage`: in this process, or in
Redis shared by several processes) and listeners told of every transition. Listeners hear the transitions
their own process makes; with a shared storage, :attr:`CircuitBreaker.state` also shows the others'.

The storage is held only to read and update the state, never while the guarded function runs, so calls run
concurrently and a rejection costs microseconds in memory (``benchmarks/breaker_overhead.py``).
"""

from __future__ import annotations

import asyncio
import builtins
import importlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, ParamSpec, TypeVar

from fintune.config import ReliabilitySettings
from fintune.errors import CircuitOpenError, ConfigError
from fintune.reliability.storage import (
    BreakerRecord,
    BreakerState,
    BreakerStorage,
    MemoryStorage,
    storage_from_settings,
)

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Transition",
    "resolve_exception_types",
]

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
Clock = Callable[[], float]
Listener = Callable[["Transition"], None]


# Every legal transition; CircuitBreaker._transition refuses anything else.
_ALLOWED: dict[BreakerState, frozenset[BreakerState]] = {
    BreakerState.CLOSED: frozenset({BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.HALF_OPEN, BreakerState.CLOSED}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
}


@dataclass(frozen=True)
class Transition:
    """One state change, as told to listeners."""

    breaker: str
    old: BreakerState
    new: BreakerState
    reason: str
    at: float


@dataclass(frozen=True)
class _Permit:
    """A ticket for one admitted call: the generation it was admitted in, when (on the record's clock: a HALF_OPEN
    trial is known by it) and when it started (on the timer)."""

    generation: int
    admitted_at: float
    started: float


class _StateBehaviour:
    """What one state does before a call and with its result; subclasses are stateless singletons."""

    def admit(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """Let the call run, or raise CircuitOpenError."""

    def on_success(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """A call admitted in this state succeeded."""

    def on_failure(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """A call admitted in this state failed."""


class _Closed(_StateBehaviour):
    """CLOSED: count consecutive failures, open at the threshold."""

    def on_success(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """Reset the failure streak."""
        rec.consecutive_failures = 0

    def on_failure(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """Extend the streak; open the breaker when it reaches the threshold."""
        rec.consecutive_failures += 1
        if rec.consecutive_failures >= cb.failure_threshold:
            cb._transition(rec, BreakerState.OPEN, f"{rec.consecutive_failures} consecutive failures", now)


class _Open(_StateBehaviour):
    """OPEN: reject until the recovery timeout has passed, then go HALF_OPEN and admit a trial."""

    def admit(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """Reject, unless the timeout has passed (then HALF_OPEN decides)."""
        if cb._retry_after(rec, now) > 0:
            cb._reject(rec, now)
        cb._transition(rec, BreakerState.HALF_OPEN, "recovery timeout elapsed", now)
        _STATES[BreakerState.HALF_OPEN].admit(cb, rec, now)


class _HalfOpen(_StateBehaviour):
    """HALF_OPEN: admit a fixed number of trials; all succeed -> CLOSED, one fails -> OPEN."""

    def admit(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """Admit while trial slots remain, after giving up trials unanswered for the recovery timeout (their
        slots go to the next calls; answers already in stay); else reject."""
        waiting = [t for t in rec.trial_starts if now - t <= cb.recovery_timeout_s]
        rec.trials_admitted -= len(rec.trial_starts) - len(waiting)  # lost trials' late results: counters only
        rec.trial_starts = waiting
        if rec.trials_admitted >= cb.half_open_max_calls:
            cb._reject(rec, now)
        rec.trials_admitted += 1
        rec.trial_starts.append(now)

    def on_success(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """Close once every trial has succeeded."""
        rec.trials_succeeded += 1
        if rec.trials_succeeded >= cb.half_open_max_calls:
            cb._transition(rec, BreakerState.CLOSED, f"{rec.trials_succeeded} trial call(s) succeeded", now)

    def on_failure(self, cb: CircuitBreaker, rec: BreakerRecord, now: float) -> None:
        """Reopen at the first failed trial."""
        cb._transition(rec, BreakerState.OPEN, "trial call failed", now)


_STATES: dict[BreakerState, _StateBehaviour] = {
    BreakerState.CLOSED: _Closed(),
    BreakerState.OPEN: _Open(),
    BreakerState.HALF_OPEN: _HalfOpen(),
}


def resolve_exception_types(names: Iterable[str]) -> tuple[type[BaseException], ...]:
    """Exception classes from builtin names (``"MemoryError"``) or dotted paths (``"torch.OutOfMemoryError"``)."""
    return tuple(_resolve_one(name) for name in names)


def _resolve_one(name: str) -> type[BaseException]:
    """One exception class by name; ConfigError when it does not exist or is not an exception."""
    module_name, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr) if module_name else getattr(builtins, name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"reliability exception type {name!r} not found: use a builtin name (e.g. 'RuntimeError') "
            "or a dotted path to an importable class (e.g. 'torch.OutOfMemoryError')"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ConfigError(f"reliability exception type {name!r} is not an exception class")
    return obj


class CircuitBreaker:
    """A thread-safe, asyncio-friendly circuit breaker with an injectable clock and storage."""

    def __init__(
        self,
        name: str = "model",
        *,
        failure_threshold: int = 5,
        recovery_timeout_s: float = 30.0,
        half_open_max_calls: int = 1,
        slow_call_limit_s: float | None = None,
        counted: tuple[type[BaseException], ...] = (Exception,),
        ignored: tuple[type[BaseException], ...] = (),
        clock: Clock | None = None,
        listeners: Iterable[Listener] = (),
        storage: BreakerStorage | None = None,
    ) -> None:
        """``clock`` (the record's times) defaults to ``time.monotonic``, or to ``time.time`` when the storage is
        shared; call durations use ``time.monotonic`` unless a ``clock`` is given."""
        if failure_threshold < 1 or half_open_max_calls < 1 or recovery_timeout_s <= 0:
            raise ConfigError("failure_threshold and half_open_max_calls must be >= 1, recovery_timeout_s > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout_s = recovery_timeout_s
        self.half_open_max_calls = half_open_max_calls
        self.slow_call_limit_s = slow_call_limit_s
        self.counted = counted
        self.ignored = ignored
        self.storage: BreakerStorage = storage or MemoryStorage()
        self.clock: Clock = clock or self.storage.now  # shared: the Redis server's wall clock
        # call durations: never the wall clock a shared record needs (an NTP step would make a fast call slow)
        self.timer: Clock = clock or time.monotonic
        self._listeners: list[Listener] = list(listeners)
        self._pending_lock = threading.Lock()
        self._delivery_lock = threading.RLock()  # one delivery at a time: listeners hear transitions in order
        self._pending: list[Transition] = []
        with self.storage.transaction() as rec:
            if rec.state is BreakerState.OPEN and rec.opened_at is None:
                rec.opened_at = self.clock()  # an OPEN record without a time would never time out

    @classmethod
    def from_settings(
        cls, settings: ReliabilitySettings, *, name: str = "model", scope: str | None = None,
        clock: Clock | None = None, **kwargs: Any,
    ) -> CircuitBreaker:
        """A breaker configured by ``settings.reliability``, in the storage it names (unless one is given; ``scope``
        goes into its default Redis key)."""
        kwargs.setdefault("storage", storage_from_settings(settings, name, scope))
        return cls(
            name,
            failure_threshold=settings.failure_threshold,
            recovery_timeout_s=settings.recovery_timeout_s,
            half_open_max_calls=settings.half_open_max_calls,
            slow_call_limit_s=settings.slow_call_limit_s,
            counted=resolve_exception_types(settings.counted_exceptions),
            ignored=resolve_exception_types(settings.ignored_exceptions),
            clock=clock,
            **kwargs,
        )

    # ---- public API -------------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """The current state (an OPEN breaker whose timeout has passed reports HALF_OPEN)."""
        with self.storage.transaction() as rec:
            self._half_open_if_due(rec, self.clock())
            state = rec.state
        self._notify()
        return state

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(transition)`` after every state change (outside the lock; errors are logged)."""
        self._listeners.append(listener)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` under the breaker; raise CircuitOpenError without running it when open."""
        permit = self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._record_error(permit, exc)
            raise
        self._record_return(permit)
        return result

    async def call_async(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` under the breaker (asyncio); same rules as :meth:`call`. With a shared
        storage the record's transactions run in a worker thread: their Redis round trips, and the wait for a
        lock another process holds (up to its timeout), would otherwise stall the event loop."""
        permit = await self._admit_async()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            await self._on_storage(self._record_error, permit, exc)
            raise
        await self._on_storage(self._record_return, permit)
        return result

    async def _admit_async(self) -> _Permit:
        """:meth:`_admit` for :meth:`call_async`. In a thread with a shared storage, which goes on when the caller
        is cancelled meanwhile: the slot it may then still admit (a HALF_OPEN trial) is handed back, or it would be
        held until the trial timeout with nobody to answer it."""
        if not self.storage.shared:
            return self._admit()
        admitted = asyncio.ensure_future(asyncio.to_thread(self._admit))
        try:
            return await asyncio.shield(admitted)
        except asyncio.CancelledError:
            admitted.add_done_callback(self._hand_back)
            raise

    def _hand_back(self, admitted: asyncio.Future[_Permit]) -> None:
        """Release the slot an admission admitted after its caller was cancelled (off the loop: a transaction)."""
        if admitted.cancelled() or admitted.exception() is not None:  # rejected, or never ran: nothing held
            return
        threading.Thread(target=self._record_error, args=(admitted.result(), asyncio.CancelledError()),
                         name="fintune-breaker-hand-back", daemon=True).start()

    async def _on_storage(self, step: Callable[..., T], *args: Any) -> T:
        """Run one of the record's steps: here with memory storage (microseconds), in a thread with a shared one."""
        return await asyncio.to_thread(step, *args) if self.storage.shared else step(*args)

    def is_failure(self, exc: BaseException) -> bool:
        """Whether ``exc`` counts as a failure (counted type and not an ignored one)."""
        return isinstance(exc, self.counted) and not isinstance(exc, self.ignored)

    def trip(self, reason: str = "opened by hand") -> None:
        """Force the breaker OPEN now (restarting its timeout), e.g. when recovery gave up on the model."""
        with self.storage.transaction() as rec:
            now = self.clock()
            if rec.state is BreakerState.OPEN:
                rec.opened_at = now
            else:
                self._transition(rec, BreakerState.OPEN, reason, now)
        self._notify()

    def reset(self, reason: str = "reset by hand") -> None:
        """Force the breaker CLOSED with a clean failure streak."""
        with self.storage.transaction() as rec:
            if rec.state is not BreakerState.CLOSED:
                self._transition(rec, BreakerState.CLOSED, reason, self.clock())
            rec.consecutive_failures = 0  # already CLOSED too: the streak is what a reset clears
        self._notify()

    def retry_after_s(self) -> float:
        """Seconds until the breaker admits a call (OPEN, or HALF_OPEN with every trial slot taken; else 0)."""
        with self.storage.transaction() as rec:
            return self._seconds_to_trial(rec, self.clock())

    def snapshot(self) -> dict[str, Any]:
        """State, settings and counters as a JSON-ready dict (for /metrics and diagnostics), read at once."""
        with self.storage.transaction() as rec:
            now = self.clock()
            self._half_open_if_due(rec, now)
            counters = asdict(rec)
            retry_after = self._seconds_to_trial(rec, now)
        self._notify()
        for internal in ("generation", "opened_at", "trial_starts"):
            counters.pop(internal)
        counters["state"] = counters["state"].value
        return {
            "name": self.name,
            **counters,
            "retry_after_s": retry_after,
            "failure_threshold": self.failure_threshold,
            "recovery_timeout_s": self.recovery_timeout_s,
            "half_open_max_calls": self.half_open_max_calls,
            "slow_call_limit_s": self.slow_call_limit_s,
            "storage": type(self.storage).__name__,
        }

    # ---- internals (inside a storage transaction unless said otherwise) ----------------------------------
    def _admit(self) -> _Permit:
        """Ask the current state to admit a call; returns the call's permit or raises CircuitOpenError."""
        try:
            with self.storage.transaction() as rec:
                now = self.clock()
                _STATES[rec.state].admit(self, rec, now)
                rec.calls += 1
                generation = rec.generation
        finally:
            self._notify()
        return _Permit(generation, now, self.timer())  # timed from here: the storage's lock wait is not the call's

    def _record_return(self, permit: _Permit) -> None:
        """A call returned: a success, or a failure when it was slower than the slow-call limit."""
        elapsed = self.timer() - permit.started
        with self.storage.transaction() as rec:
            now = self.clock()
            limit = self.slow_call_limit_s
            if limit is not None and elapsed > limit:
                rec.slow_calls += 1
                self._on_result(rec, permit, now, failed=True)
            else:
                self._on_result(rec, permit, now, failed=False)
        self._notify()

    def _record_error(self, permit: _Permit, exc: BaseException) -> None:
        """A call raised: a failure, an ignored business error (success), or a cancellation (slot released)."""
        with self.storage.transaction() as rec:
            now = self.clock()
            if self.is_failure(exc):
                self._on_result(rec, permit, now, failed=True)
            elif isinstance(exc, Exception):
                rec.ignored_errors += 1
                self._on_result(rec, permit, now, failed=False)
            elif self._answered_trial(rec, permit):
                rec.trials_admitted -= 1  # cancelled: its slot goes to the next call
        self._notify()

    def _on_result(self, rec: BreakerRecord, permit: _Permit, now: float, *, failed: bool) -> None:
        """Count the result; let the state act on it only if the call was admitted in the current state."""
        if failed:
            rec.failures += 1
        else:
            rec.successes += 1
        if permit.generation != rec.generation:
            return
        if rec.state is BreakerState.HALF_OPEN and not self._answered_trial(rec, permit):
            return  # a trial given up for its silence: its slot already went to another call
        behaviour = _STATES[rec.state]
        if failed:
            behaviour.on_failure(self, rec, now)
        else:
            behaviour.on_success(self, rec, now)

    @staticmethod
    def _answered_trial(rec: BreakerRecord, permit: _Permit) -> bool:
        """Take an answering HALF_OPEN trial of the current generation off the unanswered list; False when it is
        not one (admitted in another generation, or given up)."""
        if permit.generation != rec.generation or rec.state is not BreakerState.HALF_OPEN:
            return False
        if permit.admitted_at not in rec.trial_starts:
            return False
        rec.trial_starts.remove(permit.admitted_at)
        return True

    def _transition(self, rec: BreakerRecord, new: BreakerState, reason: str, now: float) -> None:
        """The only place the state changes: check legality, reset per-state counters, queue the event."""
        old = rec.state
        if new not in _ALLOWED[old]:
            raise RuntimeError(f"illegal circuit breaker transition {old.value} -> {new.value}")
        rec.state = new
        rec.generation += 1
        rec.trials_admitted = rec.trials_succeeded = 0
        rec.trial_starts = []
        rec.opened_at = now if new is BreakerState.OPEN else None
        if new is BreakerState.CLOSED:
            rec.consecutive_failures = 0
        key = f"{old.value}->{new.value}"
        rec.transitions[key] = rec.transitions.get(key, 0) + 1
        with self._pending_lock:
            self._pending.append(Transition(self.name, old, new, reason, now))

    def _half_open_if_due(self, rec: BreakerRecord, now: float) -> None:
        """Move an OPEN record whose timeout has passed to HALF_OPEN (what any read of the state sees)."""
        if rec.state is BreakerState.OPEN and self._retry_after(rec, now) <= 0:
            self._transition(rec, BreakerState.HALF_OPEN, "recovery timeout elapsed", now)

    def _seconds_to_trial(self, rec: BreakerRecord, now: float) -> float:
        """Seconds until the record admits a call: the OPEN timeout's rest, or in a full HALF_OPEN until its oldest
        unanswered trial is given up; 0 otherwise."""
        if rec.state is BreakerState.OPEN:
            return max(0.0, self._retry_after(rec, now))
        if rec.state is BreakerState.HALF_OPEN and rec.trials_admitted >= self.half_open_max_calls and rec.trial_starts:
            return max(0.0, min(rec.trial_starts) + self.recovery_timeout_s - now)
        return 0.0

    def _retry_after(self, rec: BreakerRecord, now: float) -> float:
        """Seconds left of the OPEN timeout (may be negative)."""
        opened_at = rec.opened_at if rec.opened_at is not None else now
        return opened_at + self.recovery_timeout_s - now

    def _reject(self, rec: BreakerRecord, now: float) -> None:
        """Count a rejection and raise CircuitOpenError."""
        rec.rejections += 1
        raise CircuitOpenError(self.name, rec.state.value, self._seconds_to_trial(rec, now))

    def _notify(self) -> None:
        """Tell listeners about queued transitions, in order (state lock NOT held); a listener that raises is logged.

        Deliveries are serialised: a thread that queued a later transition waits until an earlier one has been
        heard by every listener, so a listener that keeps the latest state (the monitor) ends on the true one.
        """
        if not self._pending:
            return
        with self._delivery_lock:
            with self._pending_lock:
                events, self._pending = self._pending, []
            self._deliver(events)

    def _deliver(self, events: list[Transition]) -> None:
        """Log each transition and hand it to every listener."""
        for event in events:
            log.warning("circuit breaker %r: %s -> %s (%s)", event.breaker, event.old.value, event.new.value,
                        event.reason)
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    log.exception("circuit breaker listener %r failed", listener)
