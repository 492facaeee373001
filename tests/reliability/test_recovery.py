"""RecoveryManager: real out-of-memory errors (impossible allocations), real threads, injected sleep and clock."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import torch

from fintune.config import RecoverySettings, ReliabilitySettings
from fintune.errors import CircuitOpenError, RecoveryError
from fintune.reliability import BreakerState, CircuitBreaker, RecoveryManager, RecoveryOutcome, is_out_of_memory

IMPOSSIBLE_BYTES = 1 << 60  # no machine has an exabyte: allocating it fails at once, without using memory


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GreedyModel:
    """A model whose prediction tries to allocate an exabyte: a real MemoryError."""

    def predict(self, text: str) -> str:
        bytearray(IMPOSSIBLE_BYTES)
        return "unreachable"


class TorchGreedyModel:
    """A model whose prediction asks torch's CPU allocator for an exabyte: torch's real RuntimeError."""

    def predict(self, text: str) -> str:
        torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8)
        return "unreachable"


class GoodModel:
    """A model that answers."""

    def predict(self, text: str) -> str:
        return "positive"


class Loader:
    """Hands out the models in `plan` in order; an exception class in the plan is raised instead (a failed load)."""

    def __init__(self, *plan: object) -> None:
        self.plan = list(plan)
        self.loads = 0

    def __call__(self) -> object:
        step = self.plan[min(self.loads, len(self.plan) - 1)]
        self.loads += 1
        if isinstance(step, type) and issubclass(step, BaseException):
            bytearray(IMPOSSIBLE_BYTES)  # loading runs out of memory again, for real
        return step


def manager(loader: Loader, breaker: CircuitBreaker | None = None, **settings: object):
    sleeps: list[float] = []
    recovery = RecoveryManager(loader, RecoverySettings(**settings), breaker=breaker, sleep=sleeps.append)
    return recovery, sleeps


def test_out_of_memory_frees_memory_reloads_and_the_next_call_succeeds() -> None:
    loader = Loader(GreedyModel(), GoodModel())
    recovery, sleeps = manager(loader)

    with pytest.raises(MemoryError):
        recovery.call(lambda m: m.predict("Profit rose."))
    assert recovery.call(lambda m: m.predict("Profit rose.")) == "positive"

    assert loader.loads == 2
    [outcome] = recovery.outcomes("out_of_memory")
    assert outcome.succeeded and outcome.attempts == 1
    assert "gc_collected" in outcome.details["freed"]
    assert sleeps == []  # the first reload attempt does not wait


def test_torch_cpu_allocation_failure_is_recognised_and_recovered() -> None:
    loader = Loader(TorchGreedyModel(), GoodModel())
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(), clock=ManualClock())
    recovery, _ = manager(loader, breaker)
    with pytest.raises(RuntimeError, match="allocate"):
        recovery.call(lambda m: m.predict("x"))
    assert recovery.call(lambda m: m.predict("x")) == "positive"
    assert breaker.state is BreakerState.CLOSED


def test_reload_that_keeps_failing_stops_at_max_attempts_and_the_breaker_stays_open() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(), clock=clock)
    loader = Loader(GreedyModel(), MemoryError)  # every reload runs out of memory too
    recovery, sleeps = manager(loader, breaker, oom_max_attempts=3, oom_backoff_s=1.0, oom_backoff_factor=2.0)

    with pytest.raises(MemoryError):
        recovery.call(lambda m: m.predict("x"))

    [outcome] = recovery.outcomes("out_of_memory")
    assert not outcome.succeeded
    assert outcome.attempts == 3
    assert outcome.error is not None and outcome.error.startswith("MemoryError")
    assert sleeps == [1.0, 2.0]
    assert loader.loads == 1 + 3
    assert breaker.state is BreakerState.OPEN

    clock.now += 29.0
    with pytest.raises(CircuitOpenError):
        recovery.call(lambda m: m.predict("x"))
    assert loader.loads == 4, "an open breaker must not trigger more reloads"
    assert breaker.state is BreakerState.OPEN


def test_backoff_grows_by_the_factor_and_is_capped() -> None:
    recovery, sleeps = manager(Loader(GreedyModel(), MemoryError), oom_max_attempts=5, oom_backoff_s=1.0,
                               oom_backoff_factor=10.0, oom_backoff_max_s=30.0)
    with pytest.raises(MemoryError):
        recovery.call(lambda m: m.predict("x"))
    assert sleeps == [1.0, 10.0, 30.0, 30.0]


def test_concurrent_out_of_memory_errors_trigger_one_reload() -> None:
    barrier = threading.Barrier(4)

    class CrowdedModel:
        def predict(self, text: str) -> str:
            barrier.wait(timeout=5)  # all four requests are on the old model before any fails
            bytearray(IMPOSSIBLE_BYTES)
            return "unreachable"

    loader = Loader(CrowdedModel(), GoodModel())
    recovery, _ = manager(loader)
    recovery.model  # noqa: B018  load the first model before the threads start
    errors: list[BaseException] = []

    def request() -> None:
        try:
            recovery.call(lambda m: m.predict("x"))
        except MemoryError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(errors) == 4
    assert loader.loads == 2
    outcomes = recovery.outcomes("out_of_memory")
    assert sum(1 for o in outcomes if not o.details.get("already_reloaded")) == 1


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_drift_hooks_all_run_even_when_one_raises() -> None:
    recovery, _ = manager(Loader(GoodModel()))
    seen: list[object] = []

    def broken(report: object) -> None:
        raise RuntimeError("hook bug")

    recovery.add_drift_hook(seen.append)
    recovery.add_drift_hook(broken)
    recovery.add_drift_hook(lambda r: seen.append(("second", r)))
    outcome = recovery.handle_drift({"kl": 0.4})
    assert seen == [{"kl": 0.4}, ("second", {"kl": 0.4})]
    assert not outcome.succeeded and outcome.details["failed_hooks"] == ["broken"]


def test_latency_spike_logs_one_diagnostic_snapshot_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(), clock=ManualClock())
    recovery, _ = manager(Loader(GoodModel()), breaker, latency_window=50, latency_min_samples=20)
    outcomes: list[RecoveryOutcome] = []
    recovery.on_outcome(outcomes.append)
    normal, slow = [0.1] * 50, [0.1] * 40 + [0.5] * 10

    with caplog.at_level(logging.WARNING, logger="fintune.reliability.recovery"):
        assert recovery.check_latency([0.1] * 10) is None  # too few to judge
        assert recovery.check_latency(normal) is None  # learns the baseline p95 = 0.1 s
        first = recovery.check_latency(slow, queue_depth=7, batch_size=8)
        assert recovery.check_latency(slow) is None  # same episode
        assert recovery.check_latency(normal) is None  # recovered
        second = recovery.check_latency(slow)

    assert first is not None and second is not None
    spike_logs = [r for r in caplog.records if "latency spike" in r.getMessage()]
    assert len(spike_logs) == 2
    d = first.details
    assert d["limit_s"] == pytest.approx(0.3)  # 3 x the learned baseline, below the 2 s absolute limit
    assert d["p95_s"] > 0.3
    assert d["queue_depth"] == 7 and d["batch_size"] == 8
    assert d["memory"]["rss_mb"] > 0
    assert d["breaker"]["state"] == "closed"
    assert len(d["recent_latencies_s"]) == 20
    assert [o.event for o in outcomes] == ["latency_spike", "latency_spike"]


def test_absolute_latency_limit_without_baseline() -> None:
    recovery, _ = manager(Loader(GoodModel()), latency_window=100, latency_min_samples=20, latency_spike_p95_s=1.0)
    assert recovery.check_latency([0.5] * 30) is None  # window not full: no baseline learned yet
    outcome = recovery.check_latency([2.0] * 30)
    assert outcome is not None and outcome.details["baseline_p95_s"] is None


def test_the_old_model_is_gone_before_the_reload_after_out_of_memory() -> None:
    import weakref

    alive_at_reload: list[bool] = []
    old = weakref.ref(first := GreedyModel())

    def loader() -> object:
        alive_at_reload.append(old() is not None)
        return GoodModel()

    recovery = RecoveryManager(loader, RecoverySettings(), model=first, sleep=lambda s: None)
    del first
    with pytest.raises(MemoryError):
        recovery.call(lambda m: m.predict("x"))  # this lambda's frame holds the model when the error is raised
    assert alive_at_reload == [False]


def test_a_failed_reload_is_not_repeated_for_calls_that_failed_on_the_same_model() -> None:
    loader = Loader(MemoryError)
    recovery, _ = manager(loader, oom_max_attempts=3)
    outcomes = [recovery.handle_oom(MemoryError(), generation=0) for _ in range(4)]  # four calls on generation 0
    assert loader.loads == 3  # one reload of three attempts, not four
    assert [o.details.get("already_reloaded", False) for o in outcomes] == [False, True, True, True]
    assert not any(o.succeeded for o in outcomes)


def test_without_a_breaker_a_failed_reload_is_retried_once_per_backoff_cap() -> None:
    clock = ManualClock()
    loader = Loader(MemoryError, MemoryError, GoodModel())
    recovery = RecoveryManager(loader, RecoverySettings(oom_max_attempts=1, oom_backoff_max_s=30.0),
                               sleep=lambda s: None, clock=clock)
    for _ in range(2):
        with pytest.raises(RecoveryError):
            recovery.call(lambda m: m.predict("x"))
    assert loader.loads == 1  # the second request did not reload again
    clock.now += 30.0
    with pytest.raises(RecoveryError):
        recovery.call(lambda m: m.predict("x"))
    clock.now += 30.0
    assert recovery.call(lambda m: m.predict("x")) == "positive" and loader.loads == 3


def test_the_trial_after_a_failed_reload_loads_before_the_slow_call_clock_starts() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(slow_call_limit_s=2.0, recovery_timeout_s=30.0),
                                           clock=clock)

    class SlowLoader(Loader):
        def __call__(self) -> object:
            clock.now += 10.0  # loading weights takes far longer than the slow-call limit
            return super().__call__()

    loader = SlowLoader(MemoryError, GoodModel())
    recovery = RecoveryManager(loader, RecoverySettings(oom_max_attempts=1), breaker=breaker,
                               sleep=lambda s: None, clock=clock)
    with pytest.raises(CircuitOpenError):  # the first load fails and trips the breaker
        recovery.call(lambda m: m.predict("x"))
    clock.now += 31.0
    assert recovery.call(lambda m: m.predict("x")) == "positive"  # the HALF_OPEN trial
    assert breaker.state is BreakerState.CLOSED


def test_a_background_reload_lets_calls_fail_fast_outside_the_breaker_until_it_is_done() -> None:
    release = threading.Event()

    class GatedLoader(Loader):
        def __call__(self) -> object:
            if self.loads:  # the reload: held until the test lets it finish
                release.wait(timeout=30)
            return super().__call__()

    breaker = CircuitBreaker.from_settings(ReliabilitySettings(failure_threshold=2))
    loader = GatedLoader(GreedyModel(), GoodModel())
    recovery = RecoveryManager(loader, RecoverySettings(), breaker=breaker, sleep=lambda s: None,
                               reload_in_background=True)
    with pytest.raises(MemoryError):  # the failing call still fails, at once
        recovery.call(lambda m: m.predict("x"))
    for _ in range(5):  # more than the failure threshold, while the reload waits
        with pytest.raises(RecoveryError, match="being reloaded"):
            recovery.call(lambda m: m.predict("x"))
    assert breaker.state is BreakerState.CLOSED  # the reload is not the model failing again
    release.set()
    for _ in range(600):  # until the reload thread is done
        try:
            recovery.model  # noqa: B018
            break
        except RecoveryError:
            time.sleep(0.05)
    assert recovery.history[-1].succeeded and recovery.call(lambda m: m.predict("x")) == "positive"
    assert loader.loads == 2


def test_after_a_failed_background_reload_the_next_load_runs_aside_too() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(recovery_timeout_s=30.0), clock=clock)
    loads: list[tuple[str, bool]] = []

    def loader() -> object:
        loads.append((threading.current_thread().name, recovery.reloading))
        if len(loads) == 1:
            return GreedyModel()
        if len(loads) <= 3:  # the out-of-memory reload (2 attempts) fails
            bytearray(IMPOSSIBLE_BYTES)
        return GoodModel()

    recovery = RecoveryManager(loader, RecoverySettings(oom_max_attempts=2), breaker=breaker,
                               sleep=lambda s: None, clock=clock, reload_in_background=True)

    def settled() -> None:
        for _ in range(600):
            if not recovery.reloading:
                return
            time.sleep(0.02)

    with pytest.raises(MemoryError):
        recovery.call(lambda m: m.predict("x"))
    settled()
    assert breaker.state is BreakerState.OPEN and len(loads) == 3
    clock.now += 31.0  # HALF_OPEN: the next call must not load in its own thread, the service's only model thread
    with pytest.raises(RecoveryError, match="being reloaded"):
        recovery.call(lambda m: m.predict("x"))
    settled()
    assert loads[3] == ("fintune-model-reload", True)  # was ('MainThread', False): /readyz said ready meanwhile
    assert all(thread == "fintune-model-reload" for thread, _ in loads[1:])
    assert recovery.call(lambda m: m.predict("x")) == "positive" and breaker.state is BreakerState.CLOSED


def race_for_the_reload_lock(recovery: RecoveryManager, caller: Callable[[], None]) -> None:
    """Run ``caller`` in two threads that both pass every check made outside the reload lock before either takes
    it, with the reload thread they start scheduled only once both are done; return when every reload ended."""
    started = threading.Event()
    reload_now = recovery._reload_then_resume

    def scheduled_late(*args: object) -> None:
        started.wait(10)
        reload_now(*args)

    recovery._reload_then_resume = scheduled_late  # type: ignore[method-assign]
    with recovery._reload_lock:
        callers = [threading.Thread(target=caller) for _ in range(2)]
        for thread in callers:
            thread.start()
        time.sleep(0.2)
    for thread in callers:
        thread.join(10)
    started.set()
    for thread in threading.enumerate():
        if thread.name == "fintune-model-reload":
            thread.join(10)


def test_two_out_of_memory_errors_racing_for_the_lock_start_one_background_reload() -> None:
    loader = Loader(GoodModel())
    recovery = RecoveryManager(loader, RecoverySettings(), sleep=lambda s: None, reload_in_background=True,
                               model=GoodModel())
    outcomes: list[RecoveryOutcome] = []
    race_for_the_reload_lock(recovery, lambda: outcomes.append(recovery.handle_oom(MemoryError(), 0)))
    assert sorted(next(iter(o.details)) for o in outcomes) == ["already_reloading", "reloading_in_background"]
    assert loader.loads == 1  # was 2: the second caller found the generation unchanged and reloaded again


def test_two_callers_after_a_failed_background_reload_start_one_reload_aside() -> None:
    clock = ManualClock()
    loader = Loader(GoodModel())
    recovery = RecoveryManager(loader, RecoverySettings(oom_backoff_max_s=10.0), sleep=lambda s: None, clock=clock,
                               reload_in_background=True)
    recovery._failed_at = 0.0  # a reload failed, no model, no breaker: one retry per backoff cap
    clock.now = 11.0
    refused: list[str] = []

    def use_the_model() -> None:
        with pytest.raises(RecoveryError) as caught:
            recovery.model  # noqa: B018
        refused.append(str(caught.value))

    race_for_the_reload_lock(recovery, use_the_model)
    assert len(refused) == 2 and all("being reloaded" in message for message in refused)
    assert loader.loads == 1  # was 2: the second caller found the generation unchanged and started another
