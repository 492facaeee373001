"""Log records never carry PII: the redacting record factory and filter, checked by capturing all log output."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from fintune.guardrails import PIIGuard, PIIRedactingFilter, install_log_redaction

SECRETS = ["536-22-8145", "4111 1111 1111 1111", "anna.virtanen+ir@example.com", "+358 40 123 4567", "0012345678"]
REQUEST = (
    f"Client SSN {SECRETS[0]} paid with card {SECRETS[1]}; reply to {SECRETS[2]} or call {SECRETS[3]}; "
    f"refund to account {SECRETS[4]}. Revenue rose 12 % to EUR 3.1 mn in Q3 2009."
)


@pytest.fixture
def all_log_output() -> Iterator[io.StringIO]:
    """Everything any logger emits at DEBUG and above, formatted with tracebacks, into one buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)


def _assert_clean(output: str) -> None:
    for secret in SECRETS:
        assert secret not in output
    assert "536" not in output and "4111" not in output and "virtanen" not in output


def test_guarding_a_request_with_logging_on_leaks_nothing(
    guard: PIIGuard, all_log_output: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    uninstall = install_log_redaction(guard)
    try:
        caplog.set_level(logging.DEBUG)
        log = logging.getLogger("fintune.serving.requests")
        log.info("received request: %s", REQUEST)                 # %-style arguments
        log.warning(f"raw text slipped into an f-string: {REQUEST}")  # already-formatted message
        logging.getLogger("uvicorn.error").debug("payload=%r", {"text": REQUEST})
        try:
            raise ValueError(f"cannot score {REQUEST}")
        except ValueError:
            log.exception("prediction failed")                   # traceback text carries the PII too
        result = guard.redact(REQUEST)
        log.info("guarded: %s", result.to_json())
    finally:
        uninstall()
    output = all_log_output.getvalue() + "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    _assert_clean(output)
    assert "received request" in output and "<US_SSN>" in output and "EUR 3.1 mn in Q3 2009" in output
    assert "ValueError: cannot score" in output and "prediction failed" in output


def test_uninstall_restores_the_previous_factory(guard: PIIGuard) -> None:
    before = logging.getLogRecordFactory()
    uninstall = install_log_redaction(guard)
    assert logging.getLogRecordFactory() is not before
    uninstall()
    assert logging.getLogRecordFactory() is before


def test_filter_on_one_handler_redacts_its_records(guard: PIIGuard) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(PIIRedactingFilter(guard))
    log = logging.getLogger("fintune.test.filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("card %s declined", SECRETS[1])
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert buffer.getvalue().strip() == "card <CREDIT_CARD> declined"


def test_fast_path_skips_only_text_no_recognizer_can_match() -> None:
    import random

    from fintune.guardrails.evaluation import GENERATORS
    from fintune.guardrails.log_redaction import may_hold_pii
    from fintune.guardrails.recognizers import supported_entities

    rng = random.Random(5)
    assert set(GENERATORS) | {"US_BANK_NUMBER"} == set(supported_entities())
    assert all(may_hold_pii(gen(rng)[0]) for gen in GENERATORS.values() for _ in range(50))
    assert not may_hold_pii("Operating profit rose sharply in the quarter .")


def logged_with_extra(guard: PIIGuard, fmt: str, *args: object, extra: dict[str, object]) -> str:
    """What one warning with ``extra`` fields prints through ``fmt`` while the redaction is installed."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(fmt))
    log = logging.getLogger("fintune.test.extra")
    log.addHandler(handler)
    uninstall = install_log_redaction(guard)
    try:
        log.warning(*args, extra=extra)
    finally:
        uninstall()
        log.removeHandler(handler)
    return buffer.getvalue()


def test_extra_fields_are_redacted_too(guard: PIIGuard) -> None:
    output = logged_with_extra(guard, "%(message)s|%(customer)s|%(attempt)s", "wire for %s", f"SSN {SECRETS[0]}",
                               extra={"customer": f"mail {SECRETS[2]}", "attempt": 2})
    _assert_clean(output)
    assert "wire for SSN <US_SSN>|mail <EMAIL_ADDRESS>|2" in output
    assert logging.Logger.makeRecord is logging.Logger.__dict__["makeRecord"]  # uninstalled


def test_an_extra_field_s_name_is_the_context_its_number_needs(guard: PIIGuard) -> None:
    # alone, 0012345678 is a number like any other: it was logged as it was
    output = logged_with_extra(guard, "%(message)s|%(account)s|%(routing_number)s|%(amount)s", "wire sent",
                               extra={"account": SECRETS[4], "routing_number": "021000021", "amount": 2500000})
    message, account, routing, amount = output.rstrip("\n").split("|")
    assert (message, account, amount) == ("wire sent", "<ACCOUNT_NUMBER>", "2500000")
    assert routing in {"<ABA_ROUTING_NUMBER>", "<PHONE_NUMBER>"}  # masked alone already, as a phone-shaped number


@pytest.mark.parametrize("field", ["check_ms", "account_count", "bank_latency_ns", "checkpoint_step", "routing_key"])
def test_a_field_not_named_for_a_number_keeps_its_value(guard: PIIGuard, field: str) -> None:
    # read after its name, any name was context to some recognizer: check_ms=1733500000000 became a bank number
    output = logged_with_extra(guard, f"%(message)s|%({field})s", "done", extra={field: 1733500000000})
    assert output == "done|1733500000000\n"


def test_a_guard_failure_withholds_the_record_and_never_breaks_the_logging_call(all_log_output: io.StringIO) -> None:
    class BrokenGuard:
        def redact(self, text: str) -> object:
            raise ValueError("text too long for spaCy")

    uninstall = install_log_redaction(BrokenGuard())  # type: ignore[arg-type]
    try:
        logging.getLogger("fintune.test.broken").warning("payload %s", f"card {SECRETS[1]}")
    finally:
        uninstall()
    output = all_log_output.getvalue()
    _assert_clean(output)
    assert "[withheld: the PII guard failed on this record (ValueError)]" in output


def test_uvicorn_access_lines_are_redacted_in_the_shape_its_formatter_unpacks(guard: PIIGuard) -> None:
    from uvicorn.logging import AccessFormatter

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    log = logging.getLogger("fintune.test.access")  # uvicorn.access logs the same way
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    uninstall = install_log_redaction(guard)
    try:
        for query in (f"contact={SECRETS[2]}", f"ref={SECRETS[0]}"):  # an email after "?" once went unmasked
            log.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5555", "POST", f"/v1/classify?{query}", "1.1", 200)
        for path in ("/v1/classify?card=4111+1111+1111+1111", "/4111%201111%201111%201111",  # as clients encode
                     "/v1/classify?mail=anna.virtanen%2Bir%40example.com", "/v1/classify?ssn=536%2D22%2D8145"):
            log.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5555", "GET", path, "1.1", 404)
    finally:
        uninstall()
        log.removeHandler(handler)
    lines = buffer.getvalue().splitlines()
    _assert_clean(buffer.getvalue())
    # the address pattern takes the query's "?" and "/" as part of the local part: the whole path goes
    assert lines[:2] == ['127.0.0.1:5555 - "POST /<EMAIL_ADDRESS> HTTP/1.1" 200 OK',
                         '127.0.0.1:5555 - "POST /v1/classify?ref=<US_SSN> HTTP/1.1" 200 OK']
    assert lines[2:] == ['127.0.0.1:5555 - "GET /v1/classify?card=<CREDIT_CARD> HTTP/1.1" 404 Not Found',
                         '127.0.0.1:5555 - "GET /<CREDIT_CARD> HTTP/1.1" 404 Not Found',
                         '127.0.0.1:5555 - "GET /<EMAIL_ADDRESS> HTTP/1.1" 404 Not Found',
                         '127.0.0.1:5555 - "GET /v1/classify?ssn=<US_SSN> HTTP/1.1" 404 Not Found']
