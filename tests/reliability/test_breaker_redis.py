"""The breaker on a shared Redis storage: a real redis-server on loopback, several clients and processes."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fintune.config import RecoverySettings, ReliabilitySettings
from fintune.errors import CircuitOpenError, RecoveryError
from fintune.reliability import BreakerState, CircuitBreaker, RecoveryManager, RedisStorage

redis = pytest.importorskip("redis", reason="the shared breaker storage needs redis-py: pip install 'fintune[redis]'")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManualClock:
    """Wall-clock-like seconds that move only when told to (shared by the breakers of one test)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def breaker_on(url: str, key: str, clock: ManualClock | None = None, **kwargs: object) -> CircuitBreaker:
    """A breaker with its own Redis connection, as another process would have."""
    return CircuitBreaker(storage=RedisStorage.from_url(url, key), clock=clock, **kwargs)  # type: ignore[arg-type]


def failing() -> None:
    raise ConnectionError("model down")


def test_failures_seen_by_one_breaker_open_all_of_them(redis_url: str) -> None:
    key, clock = f"test:{uuid.uuid4()}", ManualClock()
    first, second = breaker_on(redis_url, key, clock), breaker_on(redis_url, key, clock)
    for breaker in (first, second, first, second):  # four failures, counted together
        with pytest.raises(ConnectionError):
            breaker.call(failing)
    assert first.state is second.state is BreakerState.CLOSED
    with pytest.raises(ConnectionError):
        second.call(failing)
    assert first.state is BreakerState.OPEN  # the fifth, in the other breaker, opened this one
    calls = []
    with pytest.raises(CircuitOpenError) as rejected:
        first.call(lambda: calls.append(1))
    assert calls == [] and rejected.value.retry_after_s == pytest.approx(30)

    clock.now += 31  # one trial for the whole group, not one per breaker
    gate, release = threading.Event(), threading.Event()

    def trial() -> str:
        gate.set()
        release.wait(5)
        return "ok"

    worker = threading.Thread(target=lambda: first.call(trial))
    worker.start()
    assert gate.wait(5)
    with pytest.raises(CircuitOpenError):
        second.call(lambda: "second trial")
    release.set()
    worker.join(5)
    assert first.state is second.state is BreakerState.CLOSED
    snapshot = second.snapshot()
    assert snapshot["storage"] == "RedisStorage"
    assert snapshot["failures"] == 5 and snapshot["rejections"] == 2 and snapshot["successes"] == 1
    assert snapshot["transitions"] == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


CHILD = """
import sys, time
from fintune.reliability import CircuitBreaker, RedisStorage
breaker = CircuitBreaker(storage=RedisStorage.from_url(sys.argv[1], sys.argv[2]))
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))  # start together with the others
for _ in range(int(sys.argv[3])):
    breaker.call(lambda: None)
print(breaker.state.value)
"""


def test_one_workers_failed_reload_neither_opens_the_fleets_breaker_nor_retries_per_call(redis_url: str) -> None:
    key, clock = f"test:{uuid.uuid4()}", ManualClock()
    loads: list[str] = []

    def broken_loader() -> str:
        loads.append("try")
        raise RuntimeError("weights missing on this node")

    settings = RecoverySettings(oom_max_attempts=1, oom_backoff_max_s=60.0)
    sick = RecoveryManager(broken_loader, settings, breaker=breaker_on(redis_url, key, clock), sleep=lambda s: None,
                           clock=clock)
    fleet = breaker_on(redis_url, key, clock)
    healthy = RecoveryManager(lambda: "model", settings, breaker=fleet, sleep=lambda s: None, clock=clock)
    for _ in range(10):  # twice the failure threshold
        with pytest.raises(RecoveryError):
            sick.call(lambda model: model)
    assert fleet.state is BreakerState.CLOSED and fleet.snapshot()["consecutive_failures"] == 0
    assert healthy.call(str.upper) == "MODEL"
    assert len(loads) == 1  # the sick worker retries once per backoff cap, not on every call
    clock.now += 61.0
    with pytest.raises(RecoveryError):
        sick.call(lambda model: model)
    assert len(loads) == 2


def test_a_transaction_that_outlived_its_lock_does_not_overwrite_a_newer_record(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"test:{uuid.uuid4()}"
    client = redis.Redis.from_url(redis_url)
    paused, other = RedisStorage(client, key, lock_timeout_s=0.3), RedisStorage(client, key, lock_timeout_s=0.3)
    with caplog.at_level(logging.WARNING, logger="fintune.reliability.storage"), paused.transaction() as stale:
        stale.successes += 100
        time.sleep(0.5)  # a long GC pause: the lock expires meanwhile
        with other.transaction() as fresh:  # takes the expired lock and writes
            fresh.failures += 1
    stored = json.loads(client.get(key))
    assert (stored["failures"], stored["successes"]) == (1, 0)  # the newer record stands
    assert any("lock expired during this transaction" in r.getMessage() for r in caplog.records)


def test_processes_and_threads_lose_no_update(redis_url: str) -> None:
    key, start_at = f"test:{uuid.uuid4()}", time.time() + 4
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, redis_url, key, "200", str(start_at)], stdout=subprocess.PIPE,
                         text=True, cwd=PROJECT_ROOT)
        for _ in range(2)
    ]
    here = breaker_on(redis_url, key)
    time.sleep(max(0.0, start_at - time.time()))
    threads = [threading.Thread(target=lambda: [here.call(lambda: None) for _ in range(50)]) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    outputs = [child.communicate(timeout=60)[0].strip() for child in children]
    assert [child.returncode for child in children] == [0, 0] and outputs == ["closed", "closed"]
    stored = json.loads(redis.Redis.from_url(redis_url).get(key))
    assert stored["calls"] == stored["successes"] == 2 * 200 + 3 * 50


DYING_TRIAL = """
import os, sys
from fintune.reliability import CircuitBreaker, RedisStorage
breaker = CircuitBreaker(storage=RedisStorage.from_url(sys.argv[1], sys.argv[2]), recovery_timeout_s=0.5)
breaker.call(lambda: os._exit(3))  # admitted as the trial, then the process dies holding its slot
"""


def test_a_process_dying_in_its_trial_does_not_wedge_the_others(redis_url: str) -> None:
    key = f"test:{uuid.uuid4()}"
    here = breaker_on(redis_url, key, recovery_timeout_s=0.5)
    here.trip("test")
    time.sleep(0.6)
    child = subprocess.run([sys.executable, "-c", DYING_TRIAL, redis_url, key], cwd=PROJECT_ROOT, timeout=60)
    assert child.returncode == 3
    assert json.loads(redis.Redis.from_url(redis_url).get(key))["trials_admitted"] == 1
    time.sleep(0.6)  # longer than the recovery timeout since the dead trial started
    assert here.call(lambda: "ok") == "ok"
    assert here.state is BreakerState.CLOSED


def test_a_shared_breaker_keeps_wall_clock_times() -> None:
    storage = RedisStorage(redis.Redis(port=free_port()), "unused")
    assert CircuitBreaker(storage=storage).clock == storage.now and abs(storage.now() - time.time()) < 1
    assert CircuitBreaker().clock() == pytest.approx(time.monotonic(), abs=1)  # in memory: monotonic, as before


def test_machines_whose_clocks_disagree_judge_the_shared_record_by_the_redis_clock(redis_url: str) -> None:
    key = f"test:{uuid.uuid4()}"
    client = redis.Redis.from_url(redis_url)
    ahead = CircuitBreaker(storage=RedisStorage(client, key, wall=lambda: time.time() + 31.0), recovery_timeout_s=30)
    behind = CircuitBreaker(storage=RedisStorage(client, key, wall=lambda: time.time() - 120.0),
                            recovery_timeout_s=30)
    for _ in range(5):
        with pytest.raises(ConnectionError):
            behind.call(failing)
    assert ahead.state is BreakerState.OPEN  # its own clock would say the 30 s timeout is over: HALF_OPEN
    assert 29.0 < behind.retry_after_s() <= 30.0  # its own clock would say 150 s


def test_without_redis_each_process_keeps_its_own_breaker_until_redis_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, start_redis: Callable[[int, Path], subprocess.Popen[bytes]]
) -> None:
    port, key = free_port(), f"test:{uuid.uuid4()}"
    url = f"redis://127.0.0.1:{port}/0"
    with caplog.at_level(logging.WARNING, logger="fintune.reliability.storage"):
        storage = RedisStorage.from_url(url, key, timeout_s=0.2, retry_interval_s=60)
        breaker = CircuitBreaker(storage=storage, failure_threshold=2)
        assert breaker.call(lambda: "answer") == "answer"  # no Redis: the call still runs
        attempts = []
        pipeline = storage.client.pipeline
        storage.client.pipeline = lambda *a, **k: attempts.append(1) or pipeline(*a, **k)  # type: ignore[method-assign]
        for _ in range(2):
            with pytest.raises(ConnectionError):
                breaker.call(failing)
        assert breaker.state is BreakerState.OPEN  # and the breaker still protects this process
        assert attempts == []  # within retry_interval_s, Redis is not tried (nor waited for) again
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # warned once for the whole outage

    process = start_redis(port, tmp_path)
    try:
        storage.retry_interval_s, storage._retry_at = 0.0, 0.0  # time to try again
        breaker.reset("redis is back")
        stored = json.loads(redis.Redis(port=port).get(key))
        assert stored["state"] == "closed" and stored["failures"] == 2  # the local record went to Redis
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        process.terminate()
        process.wait(10)


def test_what_a_process_saw_during_an_outage_joins_the_shared_record_when_redis_is_back(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"test:{uuid.uuid4()}"
    storage = RedisStorage.from_url(redis_url, key, retry_interval_s=0.0)
    breaker = CircuitBreaker(storage=storage, failure_threshold=2)
    other = breaker_on(redis_url, key, failure_threshold=2)  # another worker, whose Redis stays reachable
    assert breaker.call(lambda: "answer") == "answer"  # the shared record exists: CLOSED, one success
    reachable = storage.client.pipeline

    def outage(*args: object, **kwargs: object) -> object:  # the edge of the world: this worker loses Redis
        raise redis.ConnectionError("network partition")

    storage.client.pipeline = outage  # type: ignore[method-assign]
    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(failing)
    assert breaker.state is BreakerState.OPEN  # this process protects itself meanwhile
    assert other.call(lambda: "answer") == "answer"  # the fleet's record: still CLOSED, a second success
    storage.client.pipeline = reachable  # type: ignore[method-assign]
    # the OPEN it reached alone used to be dropped for the fleet's CLOSED
    with caplog.at_level(logging.WARNING, logger="fintune.reliability.storage"), pytest.raises(CircuitOpenError):
        breaker.call(lambda: "answer")
    stored = json.loads(redis.Redis.from_url(redis_url).get(key))
    assert stored["state"] == "open" and (stored["successes"], stored["failures"]) == (2, 2)  # nothing lost
    assert stored["transitions"] == {"closed->open": 1}
    assert other.state is BreakerState.OPEN  # the whole fleet now stays off the failing model
    assert any("joined the shared one (state open" in r.getMessage() for r in caplog.records)


def test_a_state_carried_through_an_outage_does_not_overrule_the_fleet(redis_url: str) -> None:
    key, clock = f"test:{uuid.uuid4()}", ManualClock()
    storage = RedisStorage.from_url(redis_url, key, retry_interval_s=0.0)
    breaker = CircuitBreaker(storage=storage, failure_threshold=2, recovery_timeout_s=30.0, clock=clock)
    other = breaker_on(redis_url, key, clock, failure_threshold=2, recovery_timeout_s=30.0)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(failing)  # the fleet's breaker opens
    reachable = storage.client.pipeline

    def outage(*args: object, **kwargs: object) -> object:
        raise redis.ConnectionError("network partition")

    storage.client.pipeline = outage  # type: ignore[method-assign]
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "answer")  # this process saw nothing new: it only carries the OPEN it had
    clock.now += 31
    assert [other.call(lambda: "answer") for _ in range(3)] == ["answer"] * 3  # the fleet recovers meanwhile
    assert other.state is BreakerState.CLOSED
    storage.client.pipeline = reachable  # type: ignore[method-assign]
    assert breaker.state is BreakerState.CLOSED  # the stale OPEN used to reopen the fleet's breaker (half_open now)
    assert other.state is BreakerState.CLOSED and breaker.call(lambda: "answer") == "answer"


def test_settings_choose_the_redis_storage_and_its_key(redis_url: str) -> None:
    settings = ReliabilitySettings(breaker_storage="redis", redis_url=redis_url)
    breaker = CircuitBreaker.from_settings(settings)
    assert isinstance(breaker.storage, RedisStorage) and breaker.storage.key == "fintune:breaker:model"
    scoped = CircuitBreaker.from_settings(settings, scope="encoder")  # as the service builds it, per profile
    assert scoped.storage.key == "fintune:breaker:encoder:model"  # type: ignore[attr-defined]
    assert breaker.storage.retry_interval_s == settings.redis_retry_s == 5.0
    named = CircuitBreaker.from_settings(settings.model_copy(update={"redis_key": "desk-a:cpu"}))
    assert named.storage.key == "desk-a:cpu"  # type: ignore[attr-defined]
    assert type(CircuitBreaker.from_settings(ReliabilitySettings()).storage).__name__ == "MemoryStorage"


def test_an_unreadable_record_is_replaced_not_fatal(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    key = f"test:{uuid.uuid4()}"
    server = redis.Redis.from_url(redis_url)
    server.set(key, "not json")
    breaker = breaker_on(redis_url, key)
    with caplog.at_level(logging.WARNING, logger="fintune.reliability.storage"):
        assert breaker.call(lambda: "answer") == "answer"
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert json.loads(server.get(key))["successes"] == 1
    newer = json.loads(server.get(key)) | {"field_of_a_newer_version": 1}
    server.set(key, json.dumps(newer))
    assert breaker.call(lambda: "again") == "again"  # unknown fields are dropped
    assert json.loads(server.get(key))["successes"] == 2


@pytest.mark.parametrize("stored", ['{"state": "open"}', '{"calls": "7"}', '{"trial_starts": [1, "x"]}'])
def test_a_record_of_the_wrong_shape_is_replaced_too(
    redis_url: str, caplog: pytest.LogCaptureFixture, stored: str
) -> None:
    # an OPEN record without opened_at never timed out; a counter that is text failed every call with a TypeError
    key = f"test:{uuid.uuid4()}"
    server = redis.Redis.from_url(redis_url)
    server.set(key, stored)
    with caplog.at_level(logging.WARNING, logger="fintune.reliability.storage"):
        assert breaker_on(redis_url, key).call(lambda: "answer") == "answer"
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert json.loads(server.get(key))["state"] == "closed" and json.loads(server.get(key))["calls"] == 1


def test_call_async_waits_for_a_held_lock_without_stalling_the_event_loop(redis_url: str) -> None:
    key = f"test:{uuid.uuid4()}"
    breaker = breaker_on(redis_url, key)
    redis.Redis.from_url(redis_url).set(f"{key}:lock", "another-process", px=600)  # it died holding the lock

    async def main() -> tuple[str, float]:
        gaps: list[float] = []

        async def heartbeat() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        async def answer() -> str:
            return "answer"

        beating = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)
        result = await breaker.call_async(answer)  # waits about 0.6 s for the lock to expire
        await asyncio.sleep(0.05)  # the heartbeat records the gap the call left, if it left one
        beating.cancel()
        return result, max(gaps)

    result, longest_stall = asyncio.run(main())
    assert result == "answer" and longest_stall < 0.3  # was the whole wait: the loop polled Redis in time.sleep


def test_a_call_async_cancelled_while_admitted_hands_its_trial_slot_back(redis_url: str) -> None:
    key, clock = f"test:{uuid.uuid4()}", ManualClock()
    breaker = breaker_on(redis_url, key, clock, failure_threshold=1, recovery_timeout_s=30.0, half_open_max_calls=1)
    with pytest.raises(ConnectionError):
        breaker.call(failing)
    clock.now += 31  # the next call is the one HALF_OPEN trial
    redis.Redis.from_url(redis_url).set(f"{key}:lock", "another-process", px=300)

    async def answer() -> str:
        return "answer"

    async def main() -> str:
        with pytest.raises(TimeoutError):  # the caller gives up while its admission waits for the lock
            await asyncio.wait_for(breaker.call_async(answer), 0.05)
        await asyncio.sleep(0.4)  # the lock expires, the admission goes on in its thread and takes the slot
        for _ in range(100):  # ... which is then handed back
            await asyncio.sleep(0.05)
            if not json.loads(redis.Redis.from_url(redis_url).get(key))["trial_starts"]:
                break
        return await breaker.call_async(answer)

    assert asyncio.run(main()) == "answer"  # was CircuitOpenError for 30 s: the slot held for nobody
    assert breaker.state is BreakerState.CLOSED


def call_after(
    prepare: Callable[[redis.Redis, str], object], redis_url: str, caplog: pytest.LogCaptureFixture
) -> tuple[redis.Redis, str, list[str]]:
    """Let ``prepare(server, key)`` spoil a fresh key, make one call that must still be answered; the server, the
    key and the storage's warnings."""
    key = f"test:{uuid.uuid4()}"
    server = redis.Redis.from_url(redis_url)
    prepare(server, key)
    storage = RedisStorage(redis.Redis.from_url(redis_url), key, lock_timeout_s=0.2, retry_interval_s=60)
    with caplog.at_level(logging.WARNING, logger="fintune.reliability.storage"):
        assert CircuitBreaker(storage=storage).call(lambda: "answer") == "answer"
    return server, key, [r.getMessage() for r in caplog.records]


def test_a_lock_held_elsewhere_is_reported_as_such_and_does_not_block_the_call(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def taken_forever(server: redis.Redis, key: str) -> None:  # by a process that never releases it
        server.set(f"{key}:lock", "another-process-token", px=60_000)

    server, key, warnings = call_after(taken_forever, redis_url, caplog)
    assert len(warnings) == 1 and "lock failed" in warnings[0] and "unreachable" not in warnings[0]
    assert "another process holds it" in warnings[0] and "every 60 s" in warnings[0]
    assert server.get(key) is None  # nothing written under a lock this process does not hold


def test_a_key_of_the_wrong_type_does_not_fail_the_call_nor_keep_the_lock(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def a_hash(server: redis.Redis, key: str) -> None:  # GET answers WRONGTYPE, in the pipeline that took the lock
        server.hset(key, "not", "a string")

    server, key, warnings = call_after(a_hash, redis_url, caplog)
    assert any("WRONGTYPE" in warning for warning in warnings)
    assert server.get(f"{key}:lock") is None  # released at once, not left to expire


def command_counts(server: redis.Redis) -> dict[str, int]:
    """How many times the server has run each command so far."""
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in server.info("commandstats").items()}


def test_a_transaction_sends_lock_read_write_unlock_and_a_read_only_one_writes_nothing(redis_url: str) -> None:
    key = f"test:{uuid.uuid4()}"
    server = redis.Redis.from_url(redis_url)
    breaker = breaker_on(redis_url, key)

    def sent_by(action: Callable[[], object]) -> dict[str, int]:
        before = command_counts(server)
        action()
        after = command_counts(server)
        return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}

    # a call is two transactions (admit, then record), each a lock + read pipeline (SET NX, GET, TIME: the shared
    # clock) and a write + unlock pipeline (SET, then an EVAL whose script runs GET and DEL); INFO is the count's own
    assert sent_by(lambda: breaker.call(lambda: None)) == {"set": 4, "get": 4, "time": 2, "eval": 2, "del": 2,
                                                         "info": 1}
    assert sent_by(lambda: breaker.state) == {"set": 1, "get": 2, "time": 1, "eval": 1, "del": 1,
                                              "info": 1}  # no write
    assert server.get(f"{key}:lock") is None  # released
    assert json.loads(server.get(key))["successes"] == 1

