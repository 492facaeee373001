"""PII guardrails: Presidio masking of financial PII before the model and the logs, offline; output checks.

Public API (what the service and the CLI use)::

    from fintune.guardrails import PIIGuard, install_log_redaction

    guard = PIIGuard.from_settings(settings.guardrails)   # built once per process and settings, then shared
    result = guard.redact("Wire to account 0012345678")   # GuardrailResult: redacted_text, pii_types, ...
    results = guard.redact_batch(texts)                   # same, one spaCy pass over all texts (faster)
    result = guard.check_output(result, label, confidence)  # sets low_confidence and invalid_label
    install_log_redaction(guard)                          # every log record is redacted from now on

Rules: the model sees only ``result.redacted_text``; request text is logged only as ``result.redacted_text``
(and the log redaction catches what slips through); a :class:`GuardrailResult` never holds raw PII values nor
their offsets, so it may be logged and returned as is. ``fintune guard`` and ``fintune guard-eval`` are the
command-line entry points; ``evaluation`` builds the synthetic set that measures recall and leaks.
"""

from __future__ import annotations

from fintune.guardrails.engine import PIIGuard
from fintune.guardrails.log_redaction import PIIRedactingFilter, install_log_redaction
from fintune.guardrails.result import GuardrailResult

__all__ = ["GuardrailResult", "PIIGuard", "PIIRedactingFilter", "install_log_redaction"]
