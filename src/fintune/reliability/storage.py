"""Where a circuit breaker keeps its state: in this process (:class:`MemoryStorage`) or in Redis, shared by every
process that uses the same key (:class:`RedisStorage`), as pybreaker's ``CircuitMemoryStorage`` and
``CircuitRedisStorage`` do.

A storage hands the breaker its :class:`BreakerRecord` (state and counters) inside :meth:`BreakerStorage.transaction`:
nobody else reads or writes the record until the block ends, and what the block changed is kept, even when it
ends with an exception (a rejection raises :class:`~fintune.errors.CircuitOpenError` after counting itself).

With Redis the block holds a Redis lock (``SET NX PX`` with a random token, released by a compare-and-delete
script: redis-py's :class:`redis.lock.Lock`) around a read and a write of one JSON value, so the workers of
``fintune serve --workers N``, or the replicas of ``fintune classify --engine ray`` on several machines, open and
close one breaker together. Times in a shared record are wall-clock seconds (``time.time``): a monotonic clock
means nothing in another process. When Redis cannot be reached the storage does not fail the model call: it logs
a warning once and keeps a record of its own in memory (starting from the last one it saw), trying Redis again
every ``retry_interval_s`` (5 s) until it answers; each process then protects itself, as with
:class:`MemoryStorage`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from fintune.config import ReliabilitySettings
from fintune.errors import ConfigError

if TYPE_CHECKING:
    import redis

__all__ = ["BreakerRecord", "BreakerState", "BreakerStorage", "MemoryStorage", "RedisStorage", "storage_from_settings"]

log = logging.getLogger(__name__)
_LOCK_POLL_S = 0.002  # a held lock is retried this often (redis-py's default, 0.1 s, would stall a model call)
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
    trial_started_at: float | None = None
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
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["state"] = BreakerState(values.get("state", BreakerState.CLOSED))
        return cls(**values)


class BreakerStorage(Protocol):
    """What a breaker needs of its storage."""

    shared: bool
    """Whether other processes see the record (then its times must be wall-clock seconds)."""

    def transaction(self) -> AbstractContextManager[BreakerRecord]:
        """Exclusive use of the record for one block; its changes are kept when the block ends."""
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
        self, client: redis.Redis, key: str, *, lock_timeout_s: float = 5.0, retry_interval_s: float = 5.0
    ) -> None:
        """Keep the record under ``key`` (and its lock under ``key + ':lock'``) in the Redis ``client`` talks to;
        after a Redis failure, try Redis again only every ``retry_interval_s`` (meanwhile: the own record)."""
        self.client = client
        self.key = key
        self.lock_timeout_s = lock_timeout_s
        self.retry_interval_s = retry_interval_s
        self._local = threading.Lock()  # one transaction of this process at a time
        self._fallback = BreakerRecord()  # used, and kept up to date, while Redis cannot be reached
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

    @contextmanager
    def transaction(self) -> Iterator[BreakerRecord]:
        """Lock, read, hand out, write back, unlock; the process's own record while Redis is unreachable."""
        with self._local:
            if not self._reachable and time.monotonic() < self._retry_at:
                yield self._fallback  # Redis failed a moment ago: do not wait on it for every call
                return
            lock = self.client.lock(f"{self.key}:lock", timeout=self.lock_timeout_s,
                                    blocking_timeout=self.lock_timeout_s, sleep=_LOCK_POLL_S)
            record = self._load(lock)
            if record is None:
                yield self._fallback
                return
            try:
                yield record
            finally:
                self._save(record)
                self._release(lock)

    def _load(self, lock: Any) -> BreakerRecord | None:
        """Take the Redis lock and read the record (a fresh one the first time); None when Redis fails."""
        import redis

        acquired = False
        try:
            acquired = bool(lock.acquire())
            if not acquired:
                raise redis.exceptions.LockError(
                    f"{self.key}:lock not acquired within {self.lock_timeout_s} s: another process holds it, or "
                    f"died holding it (a lock expires {self.lock_timeout_s} s after it is taken)"
                )
            raw = self.client.get(self.key)
        except redis.RedisError as exc:
            self._unreachable(exc)
            if acquired:
                self._release(lock)
            return None
        if raw is None:
            return self._copy(self._fallback)
        try:
            return BreakerRecord.from_json(raw)
        except (ValueError, TypeError) as exc:  # not ours, or corrupt: start again rather than fail every call
            log.warning("circuit breaker storage %r: the stored record is unreadable (%s); starting from this "
                        "process's own", self.key, exc)
            return self._copy(self._fallback)

    def _save(self, record: BreakerRecord) -> None:
        """Write the record back (and remember it, in case Redis goes away)."""
        import redis

        self._fallback = self._copy(record)
        try:
            self.client.set(self.key, record.to_json())
        except redis.RedisError as exc:
            self._unreachable(exc)
            return
        if not self._reachable:
            log.warning("circuit breaker storage %r: Redis answers again; the breaker is shared again", self.key)
            self._reachable = True

    @staticmethod
    def _copy(record: BreakerRecord) -> BreakerRecord:
        """An independent copy of a record."""
        return dataclasses.replace(record, transitions=dict(record.transitions))

    def _release(self, lock: Any) -> None:
        """Release the Redis lock; one that expired or cannot be reached is left to expire."""
        import redis

        try:
            lock.release()
        except redis.RedisError as exc:
            self._unreachable(exc)

    def _unreachable(self, exc: BaseException) -> None:
        """Warn once per outage that this process now keeps its breaker to itself; retry Redis later."""
        import redis

        self._retry_at = time.monotonic() + self.retry_interval_s
        if self._reachable:
            lock_failed = isinstance(exc, redis.exceptions.LockError)  # Redis answered: not a network problem
            cause = "the shared record's lock failed" if lock_failed else "Redis unreachable"
            log.warning("circuit breaker storage %r: %s (%s: %s); this process keeps its own breaker and tries "
                        "Redis again every %s s", self.key, cause, type(exc).__name__, exc, self.retry_interval_s)
            self._reachable = False


def storage_from_settings(settings: ReliabilitySettings, name: str) -> BreakerStorage:
    """The storage ``settings.breaker_storage`` names for the breaker ``name``."""
    if settings.breaker_storage == "memory":
        return MemoryStorage()
    key = settings.redis_key or f"fintune:breaker:{name}"
    return RedisStorage.from_url(settings.redis_url, key, timeout_s=settings.redis_timeout_s,
                                 retry_interval_s=settings.redis_retry_s)
