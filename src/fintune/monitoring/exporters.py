"""Exports of the SystemMonitor: a ``prometheus_client`` registry and the JSON snapshot served at ``/metrics/json``.

:class:`PrometheusMetrics` owns its own ``CollectorRegistry`` (never the global default, so tests and several
monitors do not collide) with:

* ``fintune_request_latency_seconds`` — histogram, bucket edges at the latency objectives
  (``monitoring.latency_buckets_s``);
* ``fintune_requests_total{outcome}`` — counter, outcome ``ok`` or ``error``;
* ``fintune_errors_total{type}`` — counter by exception class name;
* ``fintune_predictions_total{label}`` — counter by predicted label;
* ``fintune_pii_detections_total{entity_type}`` — counter by Presidio entity type;
* ``fintune_fallbacks_total{reason}`` — counter of requests served by the fallback path;
* ``fintune_health_score`` — gauge 0-100, computed when scraped;
* ``fintune_drift_kl`` — gauge, KL(current || baseline), NaN while there is no verdict;
* ``fintune_circuit_breaker_state`` — gauge, 0 closed, 1 half_open, 2 open (NaN when unknown).

:func:`build_snapshot` lays out the JSON snapshot; its keys are documented in the README.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BREAKER_STATE_CODES", "PrometheusMetrics", "build_snapshot"]

BREAKER_STATE_CODES: dict[str, float] = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class PrometheusMetrics:
    """The monitor's Prometheus metrics in a private registry."""

    def __init__(self, latency_buckets_s: Sequence[float]) -> None:
        """Register the metrics in a registry of their own; latency histogram buckets in seconds."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "fintune_request_latency_seconds", "Request latency in seconds.", buckets=list(latency_buckets_s),
            registry=r,
        )
        self.requests = Counter("fintune_requests", "Requests handled.", ["outcome"], registry=r)
        self.errors = Counter("fintune_errors", "Failed requests by exception type.", ["type"], registry=r)
        self.predictions = Counter("fintune_predictions", "Predictions by label.", ["label"], registry=r)
        self.pii = Counter("fintune_pii_detections", "PII entities masked, by type.", ["entity_type"], registry=r)
        self.fallbacks = Counter("fintune_fallbacks", "Requests served by a fallback path.", ["reason"], registry=r)
        self.health = Gauge("fintune_health_score", "Health score, 0 (down) to 100 (healthy).", registry=r)
        self.drift_kl = Gauge("fintune_drift_kl", "KL(current || baseline) of the predictions.", registry=r)
        self.breaker = Gauge(
            "fintune_circuit_breaker_state", "Circuit breaker: 0 closed, 1 half_open, 2 open.", registry=r
        )

    def bind(
        self,
        health: Callable[[], float],
        drift_kl: Callable[[], float | None],
        breaker_state: Callable[[], str | None],
    ) -> None:
        """Make the three gauges read the monitor when scraped."""
        self.health.set_function(health)
        self.drift_kl.set_function(lambda: _nan_if_none(drift_kl()))
        self.breaker.set_function(lambda: BREAKER_STATE_CODES.get(breaker_state() or "", math.nan))

    def observe(self, latency_s: float, label: str | None, error_type: str | None) -> None:
        """Count one request."""
        self.latency.observe(latency_s)
        self.requests.labels("error" if error_type else "ok").inc()
        if error_type:
            self.errors.labels(error_type).inc()
        if label is not None:
            self.predictions.labels(label).inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def _nan_if_none(value: float | None) -> float:
    """NaN for a missing value (Prometheus' convention for 'no value')."""
    return math.nan if value is None else float(value)


def build_snapshot(
    *,
    requests: Mapping[str, Any],
    latency: Mapping[str, Any],
    throughput_rps: float,
    errors: Mapping[str, Any],
    predictions: Mapping[str, Any],
    drift: Mapping[str, Any],
    health: Mapping[str, Any],
    breaker_state: str | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON snapshot: one dict whose keys are fixed and documented (README, 'Reliability and monitoring')."""
    return {
        "requests": dict(requests),
        "latency_s": dict(latency),
        "throughput_rps": throughput_rps,
        "errors": dict(errors),
        "predictions": dict(predictions),
        "drift": dict(drift),
        "health": dict(health),
        "breaker_state": breaker_state,
        **dict(extra or {}),
    }
