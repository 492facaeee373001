"""CircuitBreaker: real failing callables, real threads, asyncio, and an injected clock instead of sleeps."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fintune.config import ReliabilitySettings
from fintune.errors import CircuitOpenError, ConfigError
from fintune.reliability import BreakerState, CircuitBreaker, Transition


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakyModel:
    """A model callable that raises ConnectionError for its first `failures` calls, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, text: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"backend down (call {self.calls})")
        return f"positive:{text}"


def make(clock: ManualClock, **overrides: object) -> CircuitBreaker:
    settings = ReliabilitySettings(**overrides)
    return CircuitBreaker.from_settings(settings, clock=clock)


def fail_times(breaker: CircuitBreaker, model: FlakyModel, n: int) -> None:
    for _ in range(n):
        with pytest.raises(ConnectionError):
            breaker.call(model, "x")


def test_opens_at_exactly_the_threshold_and_rejects_without_calling_the_model() -> None:
    clock, model = ManualClock(), FlakyModel(failures=100)
    breaker = make(clock)  # defaults: 5 failures, 30 s

    fail_times(breaker, model, 4)
    assert breaker.state is BreakerState.CLOSED
    fail_times(breaker, model, 1)
    assert breaker.state is BreakerState.OPEN
    assert model.calls == 5

    for _ in range(50):
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(model, "x")
    assert model.calls == 5, "an OPEN breaker must not call the model"
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert breaker.snapshot()["rejections"] == 50


def test_success_resets_the_streak() -> None:
    clock = ManualClock()
    breaker = make(clock, failure_threshold=3)
    fail_times(breaker, FlakyModel(100), 2)
    assert breaker.call(FlakyModel(0), "ok") == "positive:ok"
    fail_times(breaker, FlakyModel(100), 2)
    assert breaker.state is BreakerState.CLOSED


def test_trial_after_timeout_closes_on_success() -> None:
    clock, model = ManualClock(), FlakyModel(failures=5)
    breaker = make(clock)
    fail_times(breaker, model, 5)

    clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        breaker.call(model, "x")
    assert breaker.retry_after_s() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.call(model, "x") == "positive:x"
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 0


def test_failed_trial_reopens_and_restarts_the_timeout() -> None:
    clock, model = ManualClock(), FlakyModel(failures=6)
    breaker = make(clock)
    fail_times(breaker, model, 5)
    clock.advance(30)
    fail_times(breaker, model, 1)  # the trial fails
    assert breaker.state is BreakerState.OPEN
    clock.advance(29)
    with pytest.raises(CircuitOpenError):
        breaker.call(model, "x")
    clock.advance(1)
    assert breaker.call(model, "x") == "positive:x"
    assert breaker.state is BreakerState.CLOSED


def test_listeners_hear_every_transition_and_a_broken_listener_is_harmless() -> None:
    clock, model = ManualClock(), FlakyModel(failures=3)
    events: list[Transition] = []

    def broken(_: Transition) -> None:
        raise RuntimeError("listener bug")

    breaker = make(clock, failure_threshold=2)
    breaker.add_listener(broken)
    breaker.add_listener(events.append)
    fail_times(breaker, model, 2)
    clock.advance(30)
    fail_times(breaker, model, 1)
    clock.advance(30)
    breaker.call(model, "x")

    assert [(e.old.value, e.new.value) for e in events] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert breaker.snapshot()["transitions"] == {"closed->open": 1, "open->half_open": 2, "half_open->open": 1,
                                                 "half_open->closed": 1}


def test_half_open_admits_only_the_configured_number_of_trials() -> None:
    """Two trial slots: two slow trials run concurrently in real threads, a third call is rejected."""
    clock = ManualClock()
    breaker = make(clock, failure_threshold=1, half_open_max_calls=2)
    fail_times(breaker, FlakyModel(1), 1)
    clock.advance(30)

    started, release = threading.Barrier(3), threading.Event()
    results: list[str] = []

    def slow_trial() -> str:
        started.wait(timeout=5)
        release.wait(timeout=5)
        return "ok"

    threads = [threading.Thread(target=lambda: results.append(breaker.call(slow_trial))) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=5)  # both trials are inside the breaker now
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: "third")
    assert info.value.state == "half_open"
    assert breaker.state is BreakerState.HALF_OPEN
    release.set()
    for t in threads:
        t.join(timeout=5)
    assert results == ["ok", "ok"]
    assert breaker.state is BreakerState.CLOSED


def test_a_trial_that_never_answers_is_given_up_after_the_recovery_timeout() -> None:
    """A lost trial (its caller hung or died) must not hold HALF_OPEN's only slot forever."""
    clock = ManualClock()
    breaker = make(clock, failure_threshold=1, recovery_timeout_s=30)
    fail_times(breaker, FlakyModel(1), 1)
    clock.advance(30)
    release, lost = threading.Event(), []
    hung = threading.Thread(target=lambda: lost.append(breaker.call(release.wait, 5)))
    hung.start()
    while breaker.snapshot()["trials_admitted"] == 0:
        time.sleep(0.01)
    clock.advance(30)  # exactly the timeout: the trial still holds its slot
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "too early")
    clock.advance(1)
    assert breaker.call(lambda: "fresh trial") == "fresh trial"  # the lost trial's slot was taken back
    assert breaker.state is BreakerState.CLOSED
    release.set()
    hung.join(5)
    assert lost == [True] and breaker.state is BreakerState.CLOSED  # its late answer changed nothing


def test_only_counted_exceptions_are_failures_and_business_errors_are_excluded() -> None:
    clock = ManualClock()
    breaker = make(clock, failure_threshold=2, counted_exceptions=["OSError", "fintune.errors.DataError"],
                   ignored_exceptions=["FileNotFoundError"])

    def raise_(exc: BaseException) -> None:
        raise exc

    # FileNotFoundError is an OSError (counted) but listed as ignored; KeyError is not counted at all.
    for exc in [FileNotFoundError("business"), FileNotFoundError("again"), KeyError("a"), KeyError("b")]:
        with pytest.raises(type(exc)):
            breaker.call(raise_, exc)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["ignored_errors"] == 4
    assert breaker.snapshot()["failures"] == 0
    from fintune.errors import DataFormatError

    for exc in [ConnectionResetError("counted"), DataFormatError("counted subclass")]:
        with pytest.raises(type(exc)):
            breaker.call(raise_, exc)
    assert breaker.state is BreakerState.OPEN


def test_unknown_exception_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NoSuchError"):
        make(ManualClock(), counted_exceptions=["NoSuchError"])
    with pytest.raises(ConfigError, match="not an exception"):
        make(ManualClock(), counted_exceptions=["fintune.config.load_settings"])


def test_slow_calls_count_as_failures_but_still_return() -> None:
    clock = ManualClock()
    breaker = make(clock, failure_threshold=2, slow_call_limit_s=1.0)

    def slow() -> str:
        clock.advance(1.5)
        return "late"

    assert breaker.call(slow) == "late"
    assert breaker.state is BreakerState.CLOSED
    assert breaker.call(slow) == "late"
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["slow_calls"] == 2


def test_a_shared_breaker_times_calls_on_a_monotonic_clock_not_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    from fintune.reliability import MemoryStorage

    class SharedMemory(MemoryStorage):
        shared = True  # as RedisStorage: records keep wall-clock times

        def now(self) -> float:
            return time.time()

    wall = ManualClock()
    monkeypatch.setattr(time, "time", wall)
    breaker = CircuitBreaker(storage=SharedMemory(), slow_call_limit_s=5.0, failure_threshold=1)
    assert breaker.clock() == wall()  # the record's times: the storage's wall clock

    def fast_while_ntp_steps_the_clock() -> str:
        wall.advance(60)
        return "fast"

    assert breaker.call(fast_while_ntp_steps_the_clock) == "fast"
    assert breaker.state is BreakerState.CLOSED and breaker.snapshot()["slow_calls"] == 0


def test_each_silent_trial_is_given_up_on_its_own_timeout_and_answers_already_in_are_kept() -> None:
    clock = ManualClock()
    breaker = make(clock, half_open_max_calls=2, recovery_timeout_s=10)
    breaker.trip("test")
    inside = {name: threading.Event() for name in "AB"}
    release = {name: threading.Event() for name in "AB"}

    def trial(name: str) -> str:
        inside[name].set()
        release[name].wait(10)
        return name

    def start(name: str) -> threading.Thread:
        worker = threading.Thread(target=lambda: breaker.call(trial, name))
        worker.start()
        assert inside[name].wait(5)
        return worker

    clock.advance(10)
    silent = start("A")  # admitted at t=10, then never heard of in time
    clock.advance(5)
    answering = start("B")  # admitted at t=15
    clock.advance(1)
    with pytest.raises(CircuitOpenError) as full:
        breaker.call(lambda: "third")
    assert full.value.retry_after_s == pytest.approx(4)  # until A (t=10) is given up, not "retry in 0 s"
    release["B"].set()
    answering.join(5)
    clock.advance(5)  # t=21: A has been silent for 11 s
    assert breaker.call(lambda: "C") == "C"  # takes A's slot; with B's success kept, two trials succeeded
    assert breaker.state is BreakerState.CLOSED
    release["A"].set()
    silent.join(5)  # A's late answer counts, but decides nothing
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "closed" and snapshot["successes"] == 3
    assert snapshot["transitions"] == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_concurrent_failures_open_once_and_late_results_do_not_flap() -> None:
    """Eight real threads fail at once against a threshold of 5: one CLOSED->OPEN, all eight failures counted."""
    clock = ManualClock()
    breaker = make(clock)
    barrier = threading.Barrier(8)

    def failing() -> None:
        barrier.wait(timeout=5)
        raise ConnectionError("down")

    def worker() -> None:
        with pytest.raises(ConnectionError):
            breaker.call(failing)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["failures"] == 8
    assert snap["transitions"] == {"closed->open": 1}


def test_asyncio_calls_and_cancellation_release_the_trial_slot() -> None:
    clock = ManualClock()
    breaker = make(clock, failure_threshold=1)

    async def failing() -> None:
        raise TimeoutError("model timed out")

    async def hanging() -> str:
        await asyncio.sleep(3600)
        return "never"

    async def ok() -> str:
        return "positive"

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await breaker.call_async(failing)
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            await breaker.call_async(ok)
        clock.advance(30)
        task = asyncio.create_task(breaker.call_async(hanging))
        await asyncio.sleep(0)  # the trial is admitted and waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.state is BreakerState.HALF_OPEN  # cancellation is neither success nor failure
        assert await breaker.call_async(ok) == "positive"  # the slot was released
        assert breaker.state is BreakerState.CLOSED

    asyncio.run(scenario())


def test_trip_and_reset_by_hand() -> None:
    clock = ManualClock()
    breaker = make(clock)
    breaker.trip("reload failed")
    assert breaker.state is BreakerState.OPEN
    clock.advance(20)
    breaker.trip("still failing")  # restarts the timeout
    clock.advance(20)
    assert breaker.state is BreakerState.OPEN
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.call(lambda: 1) == 1

    model = FlakyModel(failures=10)
    fail_times(breaker, model, 4)  # one short of the threshold
    breaker.reset()  # already CLOSED: the streak goes all the same
    fail_times(breaker, model, 4)
    assert breaker.state is BreakerState.CLOSED


def test_listeners_hear_transitions_in_order_when_threads_race() -> None:
    """A later transition queued by another thread waits until the earlier one reached every listener."""
    clock = ManualClock()
    breaker = make(clock, failure_threshold=1)
    resetter: list[threading.Thread] = []
    last_seen: list[BreakerState] = []

    def slow_alert(transition: Transition) -> None:  # first listener: an operator resets while it pages
        if transition.new is BreakerState.OPEN and not resetter:
            resetter.append(threading.Thread(target=breaker.reset))
            resetter[0].start()
            resetter[0].join(timeout=0.3)  # without ordered delivery the reset is heard by everyone here

    breaker.add_listener(slow_alert)
    breaker.add_listener(lambda t: last_seen.append(t.new))  # keeps the latest state, like the monitor
    fail_times(breaker, FlakyModel(failures=1), 1)
    resetter[0].join(timeout=5)
    assert breaker.state is BreakerState.CLOSED
    assert last_seen == [BreakerState.OPEN, BreakerState.CLOSED]


def test_an_open_storage_without_an_opening_time_still_times_out() -> None:
    from fintune.reliability import BreakerRecord, MemoryStorage

    clock = ManualClock()
    storage = MemoryStorage(BreakerRecord(state=BreakerState.OPEN))
    breaker = CircuitBreaker(recovery_timeout_s=30, clock=clock, storage=storage)
    assert breaker.retry_after_s() == 30
    clock.advance(31)
    assert breaker.state is BreakerState.HALF_OPEN
