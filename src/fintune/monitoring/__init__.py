"""Monitoring: request metrics, the health score, prediction drift and their exports. Nothing here knows HTTP.

Public API (the serving layer wires these in)::

    from fintune.monitoring import SystemMonitor, load_drift_baseline, save_drift_baseline

    monitor = SystemMonitor.instance(settings.monitoring)   # process-wide; SystemMonitor.reset_instance() in tests
    monitor.set_drift_baseline(load_drift_baseline(model_dir))
    monitor.record(latency_s=0.12, label="positive")        # or error=exc
    monitor.record_pii("EMAIL_ADDRESS"); monitor.record_fallback("encoder")
    monitor.on_drift(hook)                                  # once per drift episode
    monitor.snapshot()                                      # the /metrics/json JSON
    monitor.prometheus_registry                             # prometheus_client CollectorRegistry

    save_drift_baseline(model_dir, validation_predictions, labels)   # training writes drift_baseline.json

Modules: :mod:`~fintune.monitoring.monitor` (SystemMonitor, health-score formula),
:mod:`~fintune.monitoring.drift` (KL/PSI/JS, smoothing, minimum window, hysteresis, baseline file) and
:mod:`~fintune.monitoring.exporters` (Prometheus metrics, JSON snapshot layout).
"""

from fintune.monitoring.drift import (
    BASELINE_FILENAME,
    DriftBaseline,
    DriftDetector,
    DriftReport,
    DriftState,
    load_drift_baseline,
    save_drift_baseline,
)
from fintune.monitoring.monitor import SystemMonitor, health_components

__all__ = [
    "BASELINE_FILENAME",
    "DriftBaseline",
    "DriftDetector",
    "DriftReport",
    "DriftState",
    "SystemMonitor",
    "health_components",
    "load_drift_baseline",
    "save_drift_baseline",
]
