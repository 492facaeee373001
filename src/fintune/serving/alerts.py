"""Drift alerts: the service's drift hook, which POSTs each drift episode's report to a webhook.

The RecoveryManager calls its drift hooks once at the start of every episode (:mod:`fintune.reliability`); the
service registers :class:`DriftWebhook` among them when ``monitoring.drift_webhook_url`` is set, so that a
shift in what the model predicts reaches an alerting endpoint (a generic webhook receiver, a chat relay)
without a human watching ``/metrics``. The POST runs in a daemon thread with a timeout: a slow or dead endpoint
never delays a request, and a failure is logged, never raised. The body holds numbers only (label shares, KL,
thresholds) and the model's name and version, never request text.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)


class DriftWebhook:
    """A drift hook that POSTs ``{"event": "prediction_drift", "service": ..., "report": ...}`` to one URL."""

    def __init__(self, url: str, timeout_s: float, service: dict[str, Any]) -> None:
        """Send to ``url`` (credentials and path never logged), waiting at most ``timeout_s``; ``service``
        names what drifted (profile, model name and version)."""
        self.url = url
        self.timeout_s = timeout_s
        self.service = service
        parts = urllib.parse.urlsplit(url)
        self.where = f"{parts.scheme}://{parts.hostname or ''}"  # what the log may show of the URL

    def __call__(self, report: Any) -> None:
        """Send the report in the background (returns at once)."""
        payload = {
            "event": "prediction_drift",
            "service": self.service,
            "report": report.as_dict() if hasattr(report, "as_dict") else dict(report),
            "sent_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        body = json.dumps(payload).encode("utf-8")
        threading.Thread(target=self._send, args=(body,), name="fintune-drift-webhook", daemon=True).start()

    def _send(self, body: bytes) -> None:
        """One POST; its outcome logged."""
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (a set URL)
                status = response.status
        except (urllib.error.URLError, OSError, ValueError) as exc:
            logger.warning("drift webhook at %s failed: %s", self.where, exc)
            return
        logger.info("drift reported to the webhook at %s (HTTP %s)", self.where, status)
