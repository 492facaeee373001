"""Log redaction: every log record's message (and traceback) passes through the guard before any handler sees it.

:func:`install_log_redaction` wraps the process's log record factory, so the redaction applies to every record
any logger creates, whichever handlers exist now or are added later (uvicorn's, pytest's). The
:class:`PIIRedactingFilter` does the same job for one handler or logger when a global hook is not wanted.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from fintune.guardrails.engine import PIIGuard

_STATE = threading.local()
WITHHELD = "[withheld: logged from inside the PII guard, may quote unredacted text]"
"""What a record created while the guard runs says instead of its message."""
QUOTING_LOGGERS = ("presidio-analyzer", "presidio-anonymizer")
"""Libraries whose DEBUG records quote tokens of the analysed text (context word lists, spans)."""


def redact_record(record: logging.LogRecord, guard: PIIGuard) -> logging.LogRecord:
    """Replace the record's message and exception text by their redacted forms (in place; returns it).

    Records the guard's own libraries create while it runs, and their DEBUG records at any time, are withheld
    instead: they quote reordered fragments of the raw text that no recognizer can reassemble.
    """
    if getattr(_STATE, "busy", False) or (record.levelno < logging.INFO and record.name in QUOTING_LOGGERS):
        record.msg, record.args, record.exc_info, record.exc_text = WITHHELD, None, None, None
        return record
    _STATE.busy = True
    try:
        _redact_message(record, guard)
        _redact_exception(record, guard)
    finally:
        _STATE.busy = False
    return record


def may_hold_pii(text: str) -> bool:
    """False only for text no recognizer can match: every supported entity needs a digit or an "@"."""
    return "@" in text or any(ch.isdigit() for ch in text)


def _redact_message(record: logging.LogRecord, guard: PIIGuard) -> None:
    """Merge the arguments into the message and mask it when it holds PII."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a malformed %-format: redact the template and the arguments' text
        message = f"{record.msg} {record.args}"
    if not may_hold_pii(message):
        return
    result = guard.redact(message)
    if result.pii_detected:
        record.msg, record.args = result.redacted_text, None


def _redact_exception(record: logging.LogRecord, guard: PIIGuard) -> None:
    """Pre-format the traceback and stack in redacted form; formatters use ``exc_text`` when it is set."""
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = guard.redact(record.exc_text).redacted_text
    if record.stack_info:
        record.stack_info = guard.redact(record.stack_info).redacted_text


class PIIRedactingFilter(logging.Filter):
    """A logging filter that redacts PII from each record it sees and always lets it through."""

    def __init__(self, guard: PIIGuard) -> None:
        """Redact with ``guard``."""
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; never drop it."""
        redact_record(record, self.guard)
        return True


def install_log_redaction(guard: PIIGuard) -> Callable[[], None]:
    """Redact every log record created from now on; returns a function that undoes it."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs), guard)

    logging.setLogRecordFactory(factory)

    def uninstall() -> None:
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)

    return uninstall
