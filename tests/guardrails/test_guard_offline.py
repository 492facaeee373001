"""The guard builds and runs with every socket blocked: no spaCy download, no public-suffix-list fetch."""

from __future__ import annotations

from guard_helpers import sockets_blocked

from fintune.config import GuardrailSettings
from fintune.guardrails import PIIGuard
from fintune.guardrails.recognizers import OfflineEmailRecognizer


def test_fresh_guard_builds_and_masks_every_type_offline() -> None:
    text = (
        "SSN 536-22-8145, card 4111 1111 1111 1111, mail li.wang+q3@eu.mail.example.net, call +358 40 123 4567, "
        "IBAN FI2112345600000785, account 0012345678, routing number 021000021."
    )
    with sockets_blocked() as attempts:
        guard = PIIGuard(GuardrailSettings())  # not the shared one: build it here, under the block
        result = guard.redact(text)
    assert attempts == []
    assert result.pii_types == [
        "ABA_ROUTING_NUMBER", "ACCOUNT_NUMBER", "CREDIT_CARD", "EMAIL_ADDRESS", "IBAN_CODE", "PHONE_NUMBER", "US_SSN"
    ]


def test_email_domain_check_uses_the_bundled_suffix_list() -> None:
    recognizer = OfflineEmailRecognizer()
    with sockets_blocked() as attempts:
        assert recognizer.validate_result("ir@invest.example.co.uk") is True
        assert recognizer.validate_result("someone@host.notarealsuffixzz") is False
    assert attempts == []
