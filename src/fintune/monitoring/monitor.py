"""SystemMonitor: the process-wide record of every request, its health score, and the drift check.

One :class:`SystemMonitor` per process (:meth:`SystemMonitor.instance`; tests use
:meth:`SystemMonitor.reset_instance` or build their own). Every request is recorded with
:meth:`SystemMonitor.record`; the monitor keeps, under one lock:

* the last ``latency_window`` requests (default 1000) of the last ``window_max_age_s`` (900 s): latency
  p50/p95/p99 and the error rate;
* per-second request counts over ``throughput_window_s`` (60 s): throughput in requests/s, divided by the
  seconds those counts cover (the window, plus the part of the second it starts in; the monitor's age when
  shorter; at least 1 s);
* totals: requests, errors by exception type, predictions by label, PII detections by type, fallbacks;
* the drift detector (when a baseline is set), fed with every predicted label.

**Health score** (0-100), each component in [0, 1] and 1 when it has no data yet::

    latency     s_lat   = clamp((L_max - p95) / (L_max - L_target), 0, 1)   L_target 0.5 s, L_max 2.0 s
    errors      s_err   = clamp(1 - error_rate / E_max, 0, 1)               E_max 0.10
    throughput  s_tput  = clamp(rps / floor, 0, 1), 1 when floor = 0        floor 0 requests/s (off)
    drift       s_drift = clamp(1 - KL / (2 * drift_threshold), 0, 1)       half marks at the threshold

    score = clamp(100 * (w_lat s_lat + w_err s_err + w_tput s_tput + w_drift s_drift) / sum(w) - penalty, 0, 100)

with weights ``w`` = 0.35 / 0.35 / 0.10 / 0.20 and ``penalty`` = 50 while the circuit breaker is OPEN, 20 while
it is HALF_OPEN, 0 otherwise (``monitoring.*`` settings). The breaker state reaches the monitor through
:meth:`SystemMonitor.on_breaker_transition` (a breaker listener) or :meth:`SystemMonitor.set_breaker_state`;
this package does not import the breaker.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from fintune.config import MonitoringSettings
from fintune.monitoring.drift import DriftBaseline, DriftDetector, DriftReport, describe
from fintune.monitoring.exporters import PrometheusMetrics, build_snapshot

__all__ = ["SystemMonitor", "health_components"]

log = logging.getLogger(__name__)
DriftListener = Callable[[DriftReport], None]


def _clamp(x: float) -> float:
    """x limited to [0, 1]."""
    return min(1.0, max(0.0, x))


def health_components(
    settings: MonitoringSettings, p95_s: float | None, error_rate: float | None, rps: float | None,
    drift_kl: float | None,
) -> dict[str, float]:
    """The four health components in [0, 1] (formula in the module docstring); 1 where there is no data."""
    s = settings
    span = s.latency_max_p95_s - s.latency_target_p95_s
    lat = 1.0 if p95_s is None else _clamp((s.latency_max_p95_s - p95_s) / span)
    err = 1.0 if error_rate is None else _clamp(1 - error_rate / s.error_rate_max)
    tput = 1.0 if rps is None or s.throughput_floor_rps == 0 else _clamp(rps / s.throughput_floor_rps)
    drift = 1.0 if drift_kl is None else _clamp(1 - drift_kl / (2 * s.drift_threshold))
    return {"latency": lat, "errors": err, "throughput": tput, "drift": drift}


class SystemMonitor:
    """Thread-safe request metrics, health score, drift detection and exports."""

    _instance: ClassVar[SystemMonitor | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, settings: MonitoringSettings | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Empty windows under ``settings`` (the defaults when None), timed by ``clock``."""
        self.settings = settings or MonitoringSettings()
        self.clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._window: deque[tuple[float, float, bool]] = deque(maxlen=self.settings.latency_window)  # at, s, failed
        self._per_second: deque[list[int]] = deque()
        self._requests = 0
        self._errors: Counter[str] = Counter()
        self._predictions: Counter[str] = Counter()
        self._pii: Counter[str] = Counter()
        self._fallbacks: Counter[str] = Counter()
        self._detector: DriftDetector | None = None
        self._drift_listeners: list[DriftListener] = []
        self._breaker_state: str | None = None
        self.prometheus = PrometheusMetrics(self.settings.latency_buckets_s)
        self.prometheus.bind(self.health_score, self._drift_kl, lambda: self._breaker_state)

    # ---- singleton ----------------------------------------------------------------------------------------
    @classmethod
    def instance(cls, settings: MonitoringSettings | None = None) -> SystemMonitor:
        """The process-wide monitor, created on first use (later ``settings`` are ignored)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls(settings)
            return cls._instance

    @classmethod
    def reset_instance(cls) -> None:
        """Forget the process-wide monitor (tests, or a reload of the settings)."""
        with cls._instance_lock:
            cls._instance = None

    # ---- recording ----------------------------------------------------------------------------------------
    def record(self, latency_s: float, label: str | None = None, error: BaseException | str | None = None) -> None:
        """Record one request: its latency, its predicted label, or the error it ended with."""
        error_type = None if error is None else (error if isinstance(error, str) else type(error).__name__)
        started_drift: DriftReport | None = None
        with self._lock:
            now = self.clock()
            self._requests += 1
            self._window.append((now, latency_s, error_type is not None))
            self._count_second(now)
            if error_type is not None:
                self._errors[error_type] += 1
            if label is not None:
                self._predictions[label] += 1
                if self._detector is not None:
                    started_drift = self._detector.update(label)
        self.prometheus.observe(latency_s, label, error_type)
        if started_drift is not None:
            self._fire_drift(started_drift)

    def record_pii(self, entity_type: str, count: int = 1) -> None:
        """Count PII entities of one type that were masked."""
        with self._lock:
            self._pii[entity_type] += count
        self.prometheus.pii.labels(entity_type).inc(count)

    def record_fallback(self, reason: str = "fallback") -> None:
        """Count one request served by a fallback path."""
        with self._lock:
            self._fallbacks[reason] += 1
        self.prometheus.fallbacks.labels(reason).inc()

    def _count_second(self, now: float) -> None:
        """Add one request to the current second's bucket; drop buckets older than the throughput window."""
        second = int(now)
        if self._per_second and self._per_second[-1][0] == second:
            self._per_second[-1][1] += 1
        else:
            self._per_second.append([second, 1])
        self._trim_seconds(now)

    def _trim_seconds(self, now: float) -> None:
        """Drop per-second buckets that end before the throughput window starts (the one it starts in stays)."""
        oldest = math.floor(now - self.settings.throughput_window_s)
        while self._per_second and self._per_second[0][0] < oldest:
            self._per_second.popleft()

    # ---- breaker and drift wiring -------------------------------------------------------------------------
    def set_breaker_state(self, state: str | None) -> None:
        """Tell the monitor the circuit breaker's state ("closed", "open", "half_open")."""
        self._breaker_state = state

    def on_breaker_transition(self, transition: Any) -> None:
        """A circuit-breaker listener: takes the transition's new state (``transition.new.value``)."""
        new = transition.new
        self.set_breaker_state(getattr(new, "value", str(new)))

    def set_drift_baseline(self, baseline: DriftBaseline | None) -> None:
        """Start (or stop, with None) drift detection against ``baseline``; the window starts empty."""
        with self._lock:
            self._detector = None if baseline is None else DriftDetector(baseline, self.settings)

    def on_drift(self, listener: DriftListener) -> None:
        """Call ``listener(report)`` once at the start of every drift episode (outside the lock)."""
        self._drift_listeners.append(listener)

    def _fire_drift(self, report: DriftReport) -> None:
        """Tell every drift listener; one that raises is logged and does not stop the others."""
        log.warning("prediction drift: KL %.3f > %.3f over %d predictions", report.kl or 0.0, report.threshold,
                    report.window_size)
        for listener in list(self._drift_listeners):
            try:
                listener(report)
            except Exception:
                log.exception("drift listener %r failed", listener)

    def _drift_kl(self) -> float | None:
        """The detector's latest KL, None without a baseline or a verdict."""
        detector = self._detector
        return None if detector is None else detector.kl

    def drift_report(self) -> DriftReport | None:
        """The drift detector's current report (None without a baseline)."""
        detector = self._detector
        return None if detector is None else detector.report()

    # ---- reading ------------------------------------------------------------------------------------------
    def recent_latencies(self) -> list[float]:
        """Latencies of the requests in the window, oldest first (for the latency-spike check)."""
        with self._lock:
            self._trim_window(self.clock())
            return [latency for _, latency, _ in self._window]

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50, p95 and p99 of the window's latencies in seconds (None when empty)."""
        latencies = self.recent_latencies()
        if not latencies:
            return {"p50": None, "p95": None, "p99": None}
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}

    def throughput_rps(self) -> float:
        """Requests per second over the seconds the kept buckets cover: the window plus the part of the second it
        starts in (or the monitor's age when shorter, at least 1 s). Dividing by the window alone read low, by up
        to a second's worth: 80 instead of 100 requests/s with a 5 s window."""
        with self._lock:
            now = self.clock()
            self._trim_seconds(now)
            count = sum(c for _, c in self._per_second)
        covered = now - max(math.floor(now - self.settings.throughput_window_s), self._started)
        return count / max(1.0, covered)

    def error_rate(self) -> float | None:
        """Share of failed requests in the window (None when empty)."""
        with self._lock:
            self._trim_window(self.clock())
            if not self._window:
                return None
            return sum(failed for _, _, failed in self._window) / len(self._window)

    def _trim_window(self, now: float) -> None:
        """Drop the window's requests older than ``window_max_age_s`` (lock held)."""
        oldest = now - self.settings.window_max_age_s
        while self._window and self._window[0][0] < oldest:
            self._window.popleft()

    def health(self) -> dict[str, Any]:
        """The health score with its components, weights and penalty."""
        s = self.settings
        with self._lock:
            self._trim_window(self.clock())
            has_requests = bool(self._window)
        components = health_components(
            s,
            self.latency_percentiles()["p95"],
            self.error_rate(),
            self.throughput_rps() if has_requests else None,
            self._drift_kl(),
        )
        weights = s.health_weights.model_dump()
        weighted = sum(weights[k] * v for k, v in components.items()) / sum(weights.values())
        penalty = {"open": s.breaker_open_penalty, "half_open": s.breaker_half_open_penalty}.get(
            self._breaker_state or "", 0.0
        )
        score = min(100.0, max(0.0, 100 * weighted - penalty))
        return {"score": round(score, 1), "components": components, "weights": weights, "penalty": penalty}

    def health_score(self) -> float:
        """The health score alone, 0 (down) to 100 (healthy)."""
        return float(self.health()["score"])

    def snapshot(self) -> dict[str, Any]:
        """The JSON-ready ``/metrics`` snapshot (layout in :func:`~fintune.monitoring.exporters.build_snapshot`)."""
        with self._lock:
            total = self._requests
            errors = dict(self._errors)
            predictions = dict(self._predictions)
            pii = dict(self._pii)
            fallbacks = dict(self._fallbacks)
            self._trim_window(self.clock())
            window = len(self._window)
        n_pred = sum(predictions.values())
        return build_snapshot(
            requests={"total": total, "window": window, "uptime_s": round(self.clock() - self._started, 3)},
            latency=self.latency_percentiles(),
            throughput_rps=self.throughput_rps(),
            errors={"rate": self.error_rate(), "total": sum(errors.values()), "by_type": errors},
            predictions={
                "counts": predictions,
                "distribution": {k: v / n_pred for k, v in predictions.items()} if n_pred else {},
            },
            drift=describe(self.drift_report(), self.settings),
            health=self.health(),
            breaker_state=self._breaker_state,
            extra={"pii_detections": pii, "fallbacks": fallbacks},
        )

    @property
    def prometheus_registry(self) -> Any:
        """The ``prometheus_client.CollectorRegistry`` holding this monitor's metrics."""
        return self.prometheus.registry
