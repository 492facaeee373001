"""Log redaction: every log record's message (and traceback) passes through the guard before any handler sees it.

:func:`install_log_redaction` wraps the process's log record factory, so the redaction applies to every record
any logger creates, whichever handlers exist now or are added later (uvicorn's, pytest's), and
``Logger.makeRecord``, which sets a call's ``extra`` fields after the factory has run. The
:class:`PIIRedactingFilter` does the same job for one handler or logger when a global hook is not wanted. A record
the guard fails on is withheld, never passed on unredacted, and the logging call itself never fails.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from fintune.guardrails.engine import PIIGuard

_STATE = threading.local()
WITHHELD = "[withheld: logged from inside the PII guard, may quote unredacted text]"
"""What a record created while the guard runs says instead of its message."""
GUARD_FAILED = "[withheld: the PII guard failed on this record ({error})]"
"""What a record says when redacting it raised."""
_STANDARD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
QUOTING_LOGGERS = ("presidio-analyzer", "presidio-anonymizer")
"""Libraries whose DEBUG records quote tokens of the analysed text (context word lists, spans)."""


def redact_record(record: logging.LogRecord, guard: PIIGuard) -> logging.LogRecord:
    """Replace the record's message and exception text by their redacted forms (in place; returns it).

    Records the guard's own libraries create while it runs, and their DEBUG records at any time, are withheld
    instead: they quote reordered fragments of the raw text that no recognizer can reassemble.
    """
    return _redact(record, guard, (_redact_message, _redact_exception, _redact_extra))


def _redact(
    record: logging.LogRecord, guard: PIIGuard, steps: Sequence[Callable[[logging.LogRecord, PIIGuard], None]]
) -> logging.LogRecord:
    """Run the redaction ``steps`` on ``record``, withholding what the guard's libraries log while it runs."""
    if getattr(_STATE, "busy", False) or (record.levelno < logging.INFO and record.name in QUOTING_LOGGERS):
        record.msg, record.args, record.exc_info, record.exc_text = WITHHELD, None, None, None
        return record
    _STATE.busy = True
    try:
        for step in steps:
            step(record, guard)
    except Exception as exc:  # fail closed, and never break the code that logs
        record.msg, record.args = GUARD_FAILED.format(error=type(exc).__name__), None
        record.exc_info = record.exc_text = record.stack_info = None
        for name in _extra_fields(record):
            setattr(record, name, "[withheld]")
    finally:
        _STATE.busy = False
    return record


def _extra_fields(record: logging.LogRecord) -> list[str]:
    """The attributes a logging call's ``extra`` added to the record."""
    return [name for name in vars(record) if name not in _STANDARD_FIELDS]


def _redact_extra(record: logging.LogRecord, guard: PIIGuard) -> None:
    """Mask PII in the text of every ``extra`` field (a formatter may print any of them). A field named for an
    account or routing number (``account``, ``routing_number``) has its value read after its name too, since the
    name is the context word such a number needs: alone, ``0012345678`` is a number like any other. Only those two
    types are taken from that reading: any name is context to some recognizer ("check" to US bank numbers), and
    ``check_ms=1733500000000`` must stay a duration."""
    for name in _extra_fields(record):
        value = str(getattr(record, name))
        masked, found = mask(value, guard)
        label = _number_label(name)
        if not found and label and may_hold_pii(value):
            labelled = guard.redact(label + value)
            if set(labelled.pii_types) & _NAMED_BY_THEIR_FIELD and labelled.redacted_text.startswith(label):
                masked, found = labelled.redacted_text.removeprefix(label), True
        if found:
            setattr(record, name, masked)


_NUMBER_WORDS = {"account", "acct", "routing", "aba", "rtn"}
_ID_WORDS = {"number", "no", "num", "nr", "id"}
_NAMED_BY_THEIR_FIELD = {"ACCOUNT_NUMBER", "ABA_ROUTING_NUMBER"}


def _number_label(field: str) -> str | None:
    """``"account number: "`` for a field named for an account or routing number (``account``, ``acct_no``,
    ``routing_number``, ``account_id``), the context its value is read in; None for any other (``account_count``)."""
    words = {word for word in re.split(r"[_\W]+", field.lower()) if word}
    named = words & _NUMBER_WORDS
    return f"{min(named)} number: " if named and words - _NUMBER_WORDS <= _ID_WORDS else None


def may_hold_pii(text: str) -> bool:
    """False only for text no recognizer can match: every supported entity needs a digit or an "@"."""
    return "@" in text or any(ch.isdigit() for ch in text)


_URL_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}|(?<=[0-9A-Za-z])\+(?=[0-9A-Za-z])")
"""A percent escape, or a ``+`` standing for a space between two characters (a query string's ``4111+1111``)."""


def mask(text: str, guard: PIIGuard) -> tuple[str, bool]:
    """``text`` with its PII masked, and whether it held any. What remains URL-encoded once that is done (an access
    log quotes the path and query string as sent: ``john.doe%40example.com``, ``card=4111+1111+1111+1111``) is
    decoded and masked again; when that finds PII, the decoded form, masked, is what is logged."""
    if not may_hold_pii(text):
        return text, False
    result = guard.redact(text)
    masked, found = result.redacted_text, result.pii_detected
    if _URL_ENCODED.search(masked):
        decoded = urllib.parse.unquote(_URL_ENCODED.sub(lambda m: " " if m.group() == "+" else m.group(), masked))
        again = guard.redact(decoded) if may_hold_pii(decoded) else None
        if again is not None and again.pii_detected:
            return again.redacted_text, True
    return masked, found


def _redact_message(record: logging.LogRecord, guard: PIIGuard) -> None:
    """Merge the arguments into the message and mask it when it holds PII."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a malformed %-format: redact the template and the arguments' text
        message = f"{record.msg} {record.args}"
    masked, found = mask(message, guard)
    if found and not _redact_arguments(record, guard):
        record.msg, record.args = masked, None


def _redact_arguments(record: logging.LogRecord, guard: PIIGuard) -> bool:
    """Mask PII in each %-argument, keeping the tuple (uvicorn's access formatter unpacks it: with ``args=None``
    each such request logged a traceback instead of its line); False, changing nothing, unless that leaves no
    PII in the message."""
    if not isinstance(record.args, tuple) or not record.args:
        return False
    masked = tuple(mask(arg, guard)[0] if isinstance(arg, str) else arg for arg in record.args)
    try:
        merged = record.msg % masked
    except (TypeError, ValueError):
        return False
    if mask(merged, guard)[1]:  # PII in the template, or across arguments
        return False
    record.args = masked
    return True


def _redact_exception(record: logging.LogRecord, guard: PIIGuard) -> None:
    """Pre-format the traceback and stack in redacted form; formatters use ``exc_text`` when it is set."""
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = mask(record.exc_text, guard)[0]
    if record.stack_info:
        record.stack_info = mask(record.stack_info, guard)[0]


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

    previous_make = logging.Logger.makeRecord

    def make_record(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous_make(self, *args, **kwargs)
        if _extra_fields(record):  # set after the factory redacted the rest: redact them now
            _redact(record, guard, (_redact_extra,))
        return record

    logging.setLogRecordFactory(factory)
    logging.Logger.makeRecord = make_record  # type: ignore[method-assign]

    def uninstall() -> None:
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)
        if logging.Logger.makeRecord is make_record:
            logging.Logger.makeRecord = previous_make  # type: ignore[method-assign]

    return uninstall
