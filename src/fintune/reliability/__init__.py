"""Reliability: the circuit breaker and automatic recovery. Nothing here knows about HTTP.

Public API (the serving layer wires these in)::

    from fintune.reliability import CircuitBreaker, RecoveryManager

    breaker = CircuitBreaker.from_settings(settings.reliability)  # its storage picks the clock
    result = breaker.call(model.predict, texts)            # CircuitOpenError while OPEN
    result = await breaker.call_async(apredict, texts)     # asyncio
    breaker.add_listener(monitor.on_breaker_transition)    # told of every transition
    breaker.snapshot()                                     # state and counters, JSON-ready
    CircuitBreaker(storage=RedisStorage.from_url(url, key))  # one breaker shared by several processes

    recovery = RecoveryManager(load_model, settings.reliability.recovery, breaker=breaker)
    recovery.call(lambda model: model.predict(texts))      # out of memory -> free, reload with backoff
    recovery.check_latency(monitor.recent_latencies(), queue_depth=q, batch_size=b)
    recovery.add_drift_hook(hook); monitor.on_drift(recovery.handle_drift)

Modules: :mod:`~fintune.reliability.breaker` (states, transitions, why not pybreaker),
:mod:`~fintune.reliability.storage` (where the breaker's state lives: memory or Redis) and
:mod:`~fintune.reliability.recovery` (out-of-memory, latency-spike and drift handlers).
"""

from fintune.reliability.breaker import BreakerState, CircuitBreaker, Transition, resolve_exception_types
from fintune.reliability.recovery import (
    RecoveryManager,
    RecoveryOutcome,
    backoff_delay,
    free_memory,
    is_out_of_memory,
)
from fintune.reliability.storage import BreakerRecord, BreakerStorage, MemoryStorage, RedisStorage

__all__ = [
    "BreakerRecord",
    "BreakerState",
    "BreakerStorage",
    "CircuitBreaker",
    "MemoryStorage",
    "RecoveryManager",
    "RecoveryOutcome",
    "RedisStorage",
    "Transition",
    "backoff_delay",
    "free_memory",
    "is_out_of_memory",
    "resolve_exception_types",
]
