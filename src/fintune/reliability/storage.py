"""Where a circuit breaker keeps its state: in this process (:class:`MemoryStorage`) or in Redis, shared by every
process that uses the same key (:class:`RedisStorage`), as pybreaker's ``CircuitMemoryStorage`` and
``CircuitRedisStorage`` do.

A storage hands the breaker its :class:`BreakerRecord` (state and counters) inside :meth:`BreakerStorage.transaction`:
nobody else reads or writes the record until the block ends, and what the block changed is kept, even when it
ends with an exception (a rejection raises :class:`~fintune.errors.CircuitOpenError` after counting itself).

With Redis the block holds a Redis lock (``SET NX PX`` with a random token, released by a compare-and-delete
script, as redis-py's :class:`redis.lock.Lock` does) around a read and a write of one JSON value, so the workers of
``fintune serve --workers N``, or the replicas of ``fintune classify --engine ray`` on several machines, open and
close one breaker together. Taking the lock and reading the value travel in one pipeline; writing the value and
releasing the lock are one script that does both only while the lock still holds this token (a transaction that
outlived its lock, in a long pause, cannot write over a newer record): two round trips a transaction, where
redis-py's lock takes four; a block that changed nothing writes nothing. Times in a shared record are wall-clock
seconds on the Redis server's clock (``TIME``, read in the lock's round trip): a monotonic clock means nothing in
another process, and two machines' wall clocks may disagree by more than a recovery timeout. When Redis cannot be
reached the storage does not fail the model call: it logs a warning once and keeps a record of its own in memory
(starting from the last one it saw), trying Redis again every ``retry_interval_s`` (5 s) until it answers; each
process then protects itself, as with :class:`MemoryStorage`. When Redis answers again, what the process counted
alone joins the shared record (:func:`merged_after_outage`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from fintune.config import ReliabilitySettings
from fintune.errors import ConfigError

if TYPE_CHECKING:
    import redis

__all__ = ["BreakerRecord", "BreakerState", "BreakerStorage", "MemoryStorage", "RedisStorage", "storage_from_settings"]

log = logging.getLogger(__name__)
_LOCK_POLL_S = 0.002  # a held lock is retried this often (redis-py's default, 0.1 s, would stall a model call)
# release the lock only if it is still ours (it may have expired and been taken by another process meanwhile)
_RELEASE_IF_OURS = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_WRITE_AND_RELEASE_IF_OURS = (
    "if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end "
    "if ARGV[2] ~= '' then redis.call('set', KEYS[2], ARGV[2]) end "
    "redis.call('del', KEYS[1]) return 1"
)
"""Write the record (unless ARGV[2] is empty) and release the lock, only while the lock is still this token's."""
_REDIS_HINT = "the shared breaker storage needs redis-py: pip install 'fintune[redis]'"


class BreakerState(StrEnum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class BreakerRecord:
    """A breaker's mutable state and counters; read and written only inside a storage transaction."""

    state: BreakerState = BreakerState.CLOSED
    generation: int = 0
    consecutive_failures: int = 0
    opened_at: float | None = None
    trials_admitted: int = 0
    trials_succeeded: int = 0
    trial_starts: list[float] = field(default_factory=list)  # when each unanswered HALF_OPEN trial was admitted
    calls: int = 0
    successes: int = 0
    failures: int = 0
    slow_calls: int = 0
    ignored_errors: int = 0
    rejections: int = 0
    transitions: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as one JSON string (what Redis holds)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> BreakerRecord:
        """The record a :meth:`to_json` string describes (fields it does not know, from another version, are
        dropped); ValueError when it is not one."""
        values = json.loads(raw)
        if not isinstance(values, dict):
            raise ValueError("a breaker record is a JSON object")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in kinds}
        for name, value in values.items():
            if name != "state" and not _has_kind(value, kinds[name]):  # a "7" would fail every call later
                raise ValueError(f"field {name!r} holds {value!r}, not {kinds[name]}")
        values["state"] = BreakerState(values.get("state", BreakerState.CLOSED))
        if values["state"] is BreakerState.OPEN and values.get("opened_at") is None:
            raise ValueError("an open record without opened_at would never time out")
        return cls(**values)


def _is_number(value: object) -> bool:
    """An int or a float, not a bool (JSON's true is no count)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _has_kind(value: object, kind: str) -> bool:
    """Whether a JSON value fits a :class:`BreakerRecord` field's annotation (one of the four it uses)."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float | None":
        return value is None or _is_number(value)
    if kind == "list[float]":
        return isinstance(value, list) and all(_is_number(v) for v in value)
    if kind == "dict[str, int]":
        return isinstance(value, dict) and all(_has_kind(v, "int") for v in value.values())
    raise TypeError(f"no check for the field type {kind}")


class BreakerStorage(Protocol):
    """What a breaker needs of its storage."""

    shared: bool
    """Whether other processes see the record (then its times must be wall-clock seconds)."""

    def transaction(self) -> AbstractContextManager[BreakerRecord]:
        """Exclusive use of the record for one block; its changes are kept when the block ends."""
        ...

    def now(self) -> float:
        """The time the record's times are in: every process sharing the record must read the same clock."""
        ...


class MemoryStorage:
    """The record in this process, guarded by a thread lock (the default)."""

    shared = False

    def __init__(self, record: BreakerRecord | None = None) -> None:
        """Start from ``record`` (default: CLOSED with zero counters)."""
        self.record = record or BreakerRecord()
        self._lock = threading.Lock()

    def transaction(self) -> MemoryStorage:
        """The record itself, changed in place, under the lock (a plain context manager: microseconds count)."""
        return self

    def now(self) -> float:
        """This process's monotonic clock (no other process reads the record)."""
        return time.monotonic()

    def __enter__(self) -> BreakerRecord:
        """Take the lock; the record."""
        self._lock.acquire()
        return self.record

    def __exit__(self, *exc_info: object) -> None:
        """Release the lock."""
        self._lock.release()


class RedisStorage:
    """The record as one JSON value in Redis, under a Redis lock, shared by every process using ``key``."""

    shared = True

    def __init__(
        self, client: redis.Redis, key: str, *, lock_timeout_s: float = 5.0, retry_interval_s: float = 5.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """Keep the record under ``key`` (and its lock under ``key + ':lock'``) in the Redis ``client`` talks to;
        after a Redis failure, try Redis again only every ``retry_interval_s`` (meanwhile: the own record).
        ``wall``: this machine's wall clock, corrected to the Redis server's (injected in tests)."""
        self.client = client
        self.wall = wall
        self._skew = 0.0  # the Redis server's clock minus this machine's, as of the last transaction
        self.key = key
        self.lock_timeout_s = lock_timeout_s
        self.retry_interval_s = retry_interval_s
        self.lock_key = f"{key}:lock"
        self._local = threading.Lock()  # one transaction of this process at a time
        self._fallback = BreakerRecord()  # used, and kept up to date, while Redis cannot be reached
        self._outage_start: BreakerRecord | None = None  # the fallback as the outage began (what it adds is ours)
        self._reachable = True
        self._retry_at = 0.0  # monotonic time before which an unreachable Redis is not tried again

    @classmethod
    def from_url(cls, url: str, key: str, *, timeout_s: float = 1.0, **kwargs: float) -> RedisStorage:
        """A storage on the Redis at ``url`` (``redis://host:6379/0``), giving up on a call after ``timeout_s``."""
        try:
            import redis
        except ImportError as exc:
            raise ConfigError(_REDIS_HINT) from exc
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, key, **kwargs)

    def now(self) -> float:
        """Wall-clock seconds on the Redis server's clock (read with each lock, in the same round trip), so that
        machines whose clocks disagree judge the shared record's times alike; this machine's clock until then."""
        return self.wall() + self._skew

    @contextmanager
    def transaction(self) -> Iterator[BreakerRecord]:
        """Lock and read, hand out, write back (if changed) and unlock; the own record while Redis is unreachable."""
        with self._local:
            if not self._reachable and time.monotonic() < self._retry_at:
                yield self._fallback  # Redis failed a moment ago: do not wait on it for every call
                return
            token = uuid.uuid4().hex
            loaded = self._lock_and_load(token)
            if loaded is None:
                yield self._fallback
                return
            record, stored = loaded
            try:
                yield record
            finally:
                self._save_and_unlock(record, token, stored)

    def _lock_and_load(self, token: str) -> tuple[BreakerRecord, str | None] | None:
        """Take the lock and read the record (a fresh one the first time) with its stored JSON; None if Redis fails."""
        import redis

        try:
            raw = self._acquire_and_get(token)
        except redis.RedisError as exc:
            self._unreachable(exc)
            if not isinstance(exc, (redis.exceptions.LockError, redis.ConnectionError, redis.TimeoutError)):
                self._release(token)  # Redis answered with an error after the lock was perhaps taken
            return None
        outage_start, self._outage_start = self._outage_start, None
        if raw is None:  # nothing shared yet: this process's record (the outage's included) is the first
            return self._copy(self._fallback), None
        try:
            record = BreakerRecord.from_json(raw)
        except (ValueError, TypeError) as exc:  # not ours, or corrupt: start again rather than fail every call
            log.warning("circuit breaker storage %r: the stored record is unreadable (%s); starting from this "
                        "process's own", self.key, exc)
            return self._copy(self._fallback), None
        if outage_start is not None:  # Redis is back: what this process saw alone joins the fleet's record
            record = merged_after_outage(record, self._fallback, outage_start)
            log.warning("circuit breaker storage %r: this process's record of the outage joined the shared one "
                        "(state %s, %d calls of its own)", self.key, record.state.value,
                        self._fallback.calls - outage_start.calls)
        return record, raw.decode() if isinstance(raw, bytes) else raw

    def _acquire_and_get(self, token: str) -> bytes | str | None:
        """``SET lock token NX PX`` and ``GET key`` in one round trip, repeated until the lock is ours or time is up."""
        import redis

        give_up_at = time.monotonic() + self.lock_timeout_s
        while True:
            acquired, raw, (seconds, micros) = (
                self.client.pipeline(transaction=False)
                .set(self.lock_key, token, nx=True, px=int(self.lock_timeout_s * 1000))
                .get(self.key).time().execute()
            )
            self._skew = seconds + micros / 1e6 - self.wall()
            if acquired:
                return raw  # nobody writes the value without the lock: what was read is current
            if time.monotonic() >= give_up_at:
                raise redis.exceptions.LockError(
                    f"{self.lock_key} not acquired within {self.lock_timeout_s} s: another process holds it, or "
                    f"died holding it (a lock expires {self.lock_timeout_s} s after it is taken)"
                )
            time.sleep(_LOCK_POLL_S)

    def _save_and_unlock(self, record: BreakerRecord, token: str, stored: str | None) -> None:
        """Write the record back unless it still reads as ``stored`` and release the lock, in one round trip and
        only while the lock is still ours (a script, fenced by the token)."""
        import redis

        self._fallback = self._copy(record)  # remembered, in case Redis goes away
        serialized = record.to_json()
        try:
            still_ours = self.client.eval(_WRITE_AND_RELEASE_IF_OURS, 2, self.lock_key, self.key, token,
                                          "" if serialized == stored else serialized)
        except redis.RedisError as exc:
            self._unreachable(exc)
            return
        if not still_ours:  # another process took the expired lock and may have written since: keep its record
            log.warning("circuit breaker storage %r: the lock expired during this transaction (a pause over %s s); "
                        "its change was dropped, not written over a newer record", self.key, self.lock_timeout_s)
        if not self._reachable:
            log.warning("circuit breaker storage %r: Redis answers again; the breaker is shared again", self.key)
            self._reachable = True

    @staticmethod
    def _copy(record: BreakerRecord) -> BreakerRecord:
        """An independent copy of a record."""
        return dataclasses.replace(record, transitions=dict(record.transitions), trial_starts=list(record.trial_starts))

    def _release(self, token: str) -> None:
        """Release the lock if it is ours; one that cannot be released now is left to expire."""
        import redis

        with contextlib.suppress(redis.RedisError):  # the caller has already reported Redis failing
            self.client.eval(_RELEASE_IF_OURS, 1, self.lock_key, token)

    def _unreachable(self, exc: BaseException) -> None:
        """Warn once per outage that this process now keeps its breaker to itself; retry Redis later."""
        import redis

        self._retry_at = time.monotonic() + self.retry_interval_s
        if self._outage_start is None:
            self._outage_start = self._copy(self._fallback)
        if self._reachable:
            lock_failed = isinstance(exc, redis.exceptions.LockError)  # Redis answered: not a network problem
            cause = "the shared record's lock failed" if lock_failed else "Redis unreachable"
            log.warning("circuit breaker storage %r: %s (%s: %s); this process keeps its own breaker and tries "
                        "Redis again every %s s", self.key, cause, type(exc).__name__, exc, self.retry_interval_s)
            self._reachable = False


_COUNTERS = ("calls", "successes", "failures", "slow_calls", "ignored_errors", "rejections")
_GRAVITY = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def merged_after_outage(shared: BreakerRecord, own: BreakerRecord, start: BreakerRecord) -> BreakerRecord:
    """The shared record once Redis answers again, with what this process counted alone since the outage began
    (``own`` less ``start``) added, and this process's state where it is the graver one: a breaker this process
    opened during the outage stays open, rather than the fleet's CLOSED record silently dropping it."""
    merged = RedisStorage._copy(shared)
    for name in _COUNTERS:
        setattr(merged, name, getattr(shared, name) + max(0, getattr(own, name) - getattr(start, name)))
    for key, count in own.transitions.items():
        added = count - start.transitions.get(key, 0)
        if added > 0:
            merged.transitions[key] = merged.transitions.get(key, 0) + added
    # only a state this process reached during the outage: one it carried in from before was the fleet's, and the
    # fleet may have moved on (a stale OPEN would reopen a breaker others have closed since)
    if own.generation != start.generation and _GRAVITY[own.state] > _GRAVITY[shared.state]:
        merged.state, merged.opened_at = own.state, own.opened_at
        merged.consecutive_failures = own.consecutive_failures
        merged.trials_admitted = merged.trials_succeeded = 0  # trials start afresh in the new generation
        merged.trial_starts = []
        merged.generation = max(shared.generation, own.generation) + 1
    return merged


def storage_from_settings(settings: ReliabilitySettings, name: str, scope: str | None = None) -> BreakerStorage:
    """The storage ``settings.breaker_storage`` names for the breaker ``name``; in Redis under
    ``settings.redis_key``, else ``fintune:breaker:<scope>:<name>`` (the service scopes it by its profile, so two
    deployments of different models sharing one Redis do not share a breaker)."""
    if settings.breaker_storage == "memory":
        return MemoryStorage()
    key = settings.redis_key or ":".join(["fintune", "breaker", *([scope] if scope else []), name])
    return RedisStorage.from_url(settings.redis_url, key, timeout_s=settings.redis_timeout_s,
                                 retry_interval_s=settings.redis_retry_s)
