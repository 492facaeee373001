"""The guard skips only texts nothing could be flagged in: every span a recognizer finds holds the evidence it
declares (recognizers.EVIDENCE), skipping changes no result, and skipped texts never reach spaCy or Presidio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.recognizer_registry import RecognizerRegistry
from test_guard_masking import FINANCIAL_SIGNAL, PII_CASES

from fintune.config import GuardrailSettings
from fintune.guardrails import PIIGuard
from fintune.guardrails import evaluation as ev
from fintune.guardrails.engine import in_original, merge_overlaps, prepare
from fintune.guardrails.recognizers import EVIDENCE, all_recognizers, count_digits

NEAR_MISSES = [
    "Call me on 555 12 34 tomorrow .",  # 6 digits after a phone word
    "Account 12345 was closed .",  # 5 digits after an account word
    "SSN 12-34 was redacted upstream .",
    "Write to investor relations at ir(at)example.com .",
    "Profit rose 5 % in Q3 .",
    "Net sales were flat .",
    "Dial +1 555 12 for the desk .",
    "Routing 02100 failed .",
    "",
]
"""Texts that hold part of a PII shape: fewer digits than it needs, or no "@"."""


def _prepared_spans(guard: PIIGuard, prepared: str) -> list[RecognizerResult]:
    """What Presidio finds in a prepared text, without the guard's skip."""
    return guard.analyzer.analyze(text=prepared, language=guard.settings.language, entities=guard.settings.entities)


def _raw_spans(guard: PIIGuard, text: str) -> list[RecognizerResult]:
    """What Presidio finds in ``text`` without the guard's skip, as offsets of ``text``."""
    prepared, origin = prepare(text)
    return in_original(_prepared_spans(guard, prepared), origin)


def _corpus() -> list[str]:
    """Every synthetic PII sentence of both guard-eval splits, the masking tests' cases, signal and near misses."""
    cases = ev.build_cases("dev", 2, seed=11) + ev.build_cases("eval", 2, seed=11)
    return [case.text for case in cases] + [text for _, text, _ in PII_CASES] + FINANCIAL_SIGNAL + NEAR_MISSES


def test_every_recognizer_declares_its_evidence() -> None:
    undeclared = [r.name for r in all_recognizers(("US", "GB", "DE", "FI")) if r.name not in EVIDENCE]
    assert undeclared == []


def test_every_span_found_holds_its_recognizers_evidence(guard: PIIGuard) -> None:
    seen: set[str] = set()
    for text in _corpus():
        prepared, _ = prepare(text)
        for span in _prepared_spans(guard, prepared):
            name = span.recognition_metadata[RecognizerResult.RECOGNIZER_NAME_KEY]
            value = prepared[span.start:span.end]
            assert EVIDENCE[name].present_in(value, count_digits(value)), (name, value)
            seen.add(name)
    # the corpus exercises the recognizers that matter, so the check above is not vacuous
    assert {"ContextSsnRecognizer", "FinancialCreditCardRecognizer", "OfflineEmailRecognizer",
            "FinancialPhoneRecognizer", "ExtraPhoneRecognizer", "CaseBlindIbanRecognizer",
            "AccountNumberRecognizer", "RoutingNumberRecognizer"} <= seen


def test_skipping_changes_no_result(guard: PIIGuard) -> None:
    texts = _corpus()
    expected = [guard.mask(text, merge_overlaps(_raw_spans(guard, text))) for text in texts]
    assert guard.redact_batch(texts) == expected
    assert [guard.redact(text) for text in texts[::7]] == expected[::7]


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[Any]:
    """Record every call of ``owner.name`` (still calling it) and return the list of calls."""
    calls: list[Any] = []
    original: Callable[..., Any] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("texts", kwargs.get("text")))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_texts_without_evidence_never_reach_the_analyzer(guard: PIIGuard, monkeypatch: pytest.MonkeyPatch) -> None:
    single = _count_calls(monkeypatch, guard.analyzer, "analyze")
    batched = _count_calls(monkeypatch, guard.batch_analyzer, "analyze_iterator")
    plain = ["Profit rose 5 % in the third quarter .", "Net sales were flat .", "", "Write to ir(at)example.com ."]
    assert not any(result.pii_detected for result in guard.redact_batch(plain))
    assert not any(guard.redact(text).pii_detected for text in plain)
    assert (single, batched) == ([], [])
    mixed = plain + ["Mail a.virtanen@example.com today .", "Operating profit was EUR 13.1 mn ."]
    results = guard.redact_batch(mixed)
    assert [r.pii_detected for r in results] == [False] * 4 + [True, False]
    assert batched == [mixed[4:]]  # only the two texts that could hold PII were analysed


def test_an_undeclared_recognizer_sees_every_text(guard: PIIGuard) -> None:
    ticker = PatternRecognizer(supported_entity="TICKER", name="TickerRecognizer",
                               patterns=[Pattern("ticker", r"\bNOKIA\b", 0.9)])
    registry = RecognizerRegistry(recognizers=[ticker], supported_languages=["en"])
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=guard.analyzer.nlp_engine, supported_languages=["en"])
    custom = PIIGuard(GuardrailSettings(entities=["TICKER"]), analyzer)
    assert custom.redact("NOKIA fell .").redacted_text == "<TICKER> fell ."
    assert custom.redact_batch(["NOKIA fell .", "Sales were flat ."])[0].pii_types == ["TICKER"]
