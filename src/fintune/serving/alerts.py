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


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns a redirect into an HTTPError: urllib would follow a 301/302/303 answer to a POST with a GET that
    drops the body, so the report would be lost while the log said it was delivered."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        """No new request: the 3xx reaches the caller as an HTTPError."""
        return None


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
        self._opener = urllib.request.build_opener(_RefuseRedirects)

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
        """One POST; its outcome logged, and nothing raised: an exception escaping this thread would be printed
        by threading's excepthook, past the log redaction, often with the whole URL (its token) in it."""
        try:
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with self._opener.open(request, timeout=self.timeout_s) as response:
                status = response.status
        except Exception as exc:  # noqa: BLE001 (see the docstring)
            logger.warning("drift webhook at %s failed: %s", self.where, _failure(exc))
            return
        logger.info("drift reported to the webhook at %s (HTTP %s)", self.where, status)


def _failure(exc: Exception) -> str:
    """What the log may say of a failed POST: never the exception's own text where it can quote the URL."""
    if isinstance(exc, urllib.error.HTTPError):
        redirected = " (a redirect: set drift_webhook_url to the final URL)" if 300 <= exc.code < 400 else ""
        return f"HTTP {exc.code}{redirected}"
    if isinstance(exc, urllib.error.URLError):  # a socket error, or urllib's own words ('no host given')
        return str(exc.reason)
    if isinstance(exc, OSError):  # a timeout, a reset connection
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return type(exc).__name__  # ValueError and http.client's errors quote the URL or the raw answer
