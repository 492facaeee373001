"""SystemMonitor: exact counts under real threads, percentiles, throughput, health score, exports, drift wiring."""

from __future__ import annotations

import json
import math
import random
import threading

import numpy as np
import pytest
from prometheus_client import generate_latest

from fintune.config import MonitoringSettings, ReliabilitySettings
from fintune.monitoring import DriftBaseline, SystemMonitor, health_components
from fintune.monitoring.drift import DriftReport
from fintune.reliability import CircuitBreaker, RecoveryManager

LABELS = ("negative", "neutral", "positive")


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def sample(monitor: SystemMonitor, name: str, **labels: str) -> float | None:
    return monitor.prometheus_registry.get_sample_value(name, labels)


def test_many_threads_recording_at_once_give_exact_counts() -> None:
    monitor = SystemMonitor(MonitoringSettings(latency_window=100_000))
    threads_n, per_thread = 8, 2500
    barrier = threading.Barrier(threads_n)

    def worker(seed: int) -> None:
        barrier.wait(timeout=5)
        for i in range(per_thread):
            if i % 10 == 0:
                monitor.record(0.5, error=TimeoutError("model timed out"))
            else:
                monitor.record(0.01 * (i % 7), label=LABELS[(i + seed) % 3])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    expected = {label: 0 for label in LABELS}
    for seed in range(threads_n):
        for i in range(per_thread):
            if i % 10:
                expected[LABELS[(i + seed) % 3]] += 1
    snap = monitor.snapshot()
    total = threads_n * per_thread
    assert snap["requests"]["total"] == total
    assert snap["errors"]["by_type"] == {"TimeoutError": total // 10}
    assert snap["predictions"]["counts"] == expected
    assert snap["errors"]["rate"] == pytest.approx(0.1)
    assert sample(monitor, "fintune_requests_total", outcome="ok") == total - total // 10
    assert sample(monitor, "fintune_errors_total", type="TimeoutError") == total // 10
    assert sample(monitor, "fintune_predictions_total", label="neutral") == expected["neutral"]
    assert sample(monitor, "fintune_request_latency_seconds_count") == total


def test_percentiles_error_rate_and_throughput() -> None:
    clock = ManualClock()
    monitor = SystemMonitor(MonitoringSettings(latency_window=100, throughput_window_s=60), clock=clock)
    rng = random.Random(3)
    latencies = [rng.uniform(0.01, 0.3) for _ in range(150)]
    for i, latency in enumerate(latencies):
        clock.now += 0.5  # two requests per second
        monitor.record(latency, label="neutral", error="ValueError" if i >= 140 else None)
    p = monitor.latency_percentiles()
    assert p["p95"] == pytest.approx(np.percentile(latencies[-100:], 95))
    assert p["p50"] == pytest.approx(np.percentile(latencies[-100:], 50))
    assert monitor.error_rate() == pytest.approx(10 / 100)  # only the window of 100 counts
    assert monitor.throughput_rps() == pytest.approx(2.0, rel=0.05)
    clock.now += 600  # ten quiet minutes: nothing left in the throughput window
    assert monitor.throughput_rps() == 0.0
    assert monitor.error_rate() == pytest.approx(10 / 100)  # the latency window keeps them a while longer


def test_an_old_incident_leaves_the_window_and_the_health_score() -> None:
    clock = ManualClock()
    monitor = SystemMonitor(MonitoringSettings(window_max_age_s=900), clock=clock)
    for _ in range(50):
        clock.now += 0.1
        monitor.record(8.0, error="MemoryError")  # slow and failing
    assert monitor.health_score() < 50
    clock.now += 600
    assert monitor.error_rate() == 1.0  # ten quiet minutes: still the latest evidence
    clock.now += 301
    assert monitor.error_rate() is None and monitor.latency_percentiles()["p95"] is None
    assert monitor.health_score() == 100.0 and monitor.snapshot()["requests"]["window"] == 0


@pytest.mark.parametrize("window_s", [1.0, 5.0, 60.0])
def test_steady_traffic_reads_its_rate_at_any_moment_of_the_second(window_s: float) -> None:
    clock = ManualClock()
    monitor = SystemMonitor(MonitoringSettings(throughput_window_s=window_s), clock=clock)
    start, sent = clock.now, 0
    for read_at in (199.015, 199.505, 199.995, 200.5):  # early, midway and late in a second
        while sent / 100 <= read_at:  # 100 requests a second up to the moment of reading
            clock.now = start + sent / 100
            monitor.record(0.01, label="neutral")
            sent += 1
        clock.now = start + read_at
        assert monitor.throughput_rps() == pytest.approx(100, rel=0.02), read_at


def test_health_score_formula() -> None:
    s = MonitoringSettings()
    assert health_components(s, None, None, None, None) == {"latency": 1, "errors": 1, "throughput": 1, "drift": 1}
    c = health_components(s, p95_s=1.25, error_rate=0.05, rps=3.0, drift_kl=0.15)
    assert c == {"latency": pytest.approx(0.5), "errors": pytest.approx(0.5), "throughput": 1.0, "drift": 0.5}
    floor = MonitoringSettings(throughput_floor_rps=4.0)
    assert health_components(floor, None, None, 1.0, None)["throughput"] == pytest.approx(0.25)

    monitor = SystemMonitor(s)
    for _ in range(90):
        monitor.record(0.1, label="neutral")
    for _ in range(10):
        monitor.record(0.1, error=RuntimeError("boom"))
    # errors at E_max score 0: 100 * (1 - 0.35) = 65
    assert monitor.health_score() == pytest.approx(65.0)


def test_breaker_state_reaches_the_monitor_through_a_listener() -> None:
    clock = ManualClock()
    monitor = SystemMonitor()
    breaker = CircuitBreaker.from_settings(ReliabilitySettings(failure_threshold=1), clock=clock)
    breaker.add_listener(monitor.on_breaker_transition)
    monitor.record(0.05, label="neutral")
    assert monitor.health_score() == 100.0

    with pytest.raises(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    assert monitor.snapshot()["breaker_state"] == "open"
    assert monitor.health_score() == 50.0
    assert sample(monitor, "fintune_circuit_breaker_state") == 2.0
    clock.now += 30
    assert breaker.state.value == "half_open"
    assert monitor.health_score() == 80.0
    breaker.call(lambda: 1)
    assert monitor.health_score() == 100.0
    assert sample(monitor, "fintune_circuit_breaker_state") == 0.0


def test_snapshot_is_json_and_prometheus_has_every_metric() -> None:
    monitor = SystemMonitor(MonitoringSettings(latency_buckets_s=[0.1, 0.5, 1.0]))
    monitor.record(0.05, label="positive")
    monitor.record(0.7, error=MemoryError())
    monitor.record_pii("EMAIL_ADDRESS", 2)
    monitor.record_fallback("encoder")
    snap = json.loads(json.dumps(monitor.snapshot()))
    assert set(snap) >= {"requests", "latency_s", "throughput_rps", "errors", "predictions", "drift", "health",
                         "breaker_state", "pii_detections", "fallbacks"}
    assert snap["predictions"]["distribution"] == {"positive": 1.0}
    assert snap["drift"]["state"] == "no_baseline" and snap["drift"]["threshold"] == 0.15
    assert set(snap["drift"]) == set(DriftReport.__dataclass_fields__) | {"drifted"}  # one shape, baseline or not
    assert snap["pii_detections"] == {"EMAIL_ADDRESS": 2} and snap["fallbacks"] == {"encoder": 1}

    text = generate_latest(monitor.prometheus_registry).decode()
    for name in ["fintune_request_latency_seconds_bucket", "fintune_requests_total", "fintune_errors_total",
                 "fintune_pii_detections_total", "fintune_fallbacks_total", "fintune_health_score",
                 "fintune_drift_kl", "fintune_circuit_breaker_state", "fintune_predictions_total"]:
        assert name in text
    assert sample(monitor, "fintune_request_latency_seconds_bucket", le="0.5") == 1.0
    assert sample(monitor, "fintune_request_latency_seconds_bucket", le="1.0") == 2.0
    assert sample(monitor, "fintune_pii_detections_total", entity_type="EMAIL_ADDRESS") == 2.0
    assert math.isnan(sample(monitor, "fintune_drift_kl") or 0.0)
    assert sample(monitor, "fintune_health_score") == monitor.health_score()


def test_drift_reaches_recovery_hooks_once_per_episode_and_a_bad_hook_cannot_break_recording() -> None:
    rng = random.Random(9)
    monitor = SystemMonitor()
    monitor.set_drift_baseline(DriftBaseline(LABELS, (120, 600, 280)))
    recovery = RecoveryManager(lambda: object())
    reports: list[object] = []

    def broken(_: object) -> None:
        raise RuntimeError("hook bug")

    recovery.add_drift_hook(broken)
    recovery.add_drift_hook(reports.append)
    monitor.on_drift(recovery.handle_drift)

    for label in rng.choices(LABELS, weights=(0.12, 0.60, 0.28), k=500):
        monitor.record(0.05, label=label)
    assert reports == [] and monitor.snapshot()["drift"]["state"] == "stable"
    for label in rng.choices(LABELS, weights=(0.05, 0.25, 0.70), k=1500):
        monitor.record(0.05, label=label)
    assert len(reports) == 1
    snap = monitor.snapshot()
    assert snap["drift"]["state"] == "drifted" and snap["drift"]["kl"] > 0.15
    assert snap["requests"]["total"] == 2000
    assert snap["health"]["components"]["drift"] < 0.5
    assert sample(monitor, "fintune_drift_kl") == pytest.approx(snap["drift"]["kl"])


def test_singleton_is_one_object_per_process_until_reset() -> None:
    SystemMonitor.reset_instance()
    seen: list[SystemMonitor] = []
    threads = [threading.Thread(target=lambda: seen.append(SystemMonitor.instance())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert len({id(m) for m in seen}) == 1
    SystemMonitor.reset_instance()
    assert SystemMonitor.instance() is not seen[0]
    SystemMonitor.reset_instance()
