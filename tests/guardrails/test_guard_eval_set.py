"""The synthetic guard-eval set: valid values, disjoint template splits, and a leak rule that catches partial masks."""

from __future__ import annotations

import random
import re

import phonenumbers
import pytest

from fintune.guardrails import PIIGuard
from fintune.guardrails import evaluation as ev


def _luhn_ok(number: str) -> bool:
    digits = [int(d) for d in number if d.isdigit()][::-1]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def test_generated_values_are_valid_for_their_type() -> None:
    rng = random.Random(7)
    for _ in range(200):
        card, _fmt = ev.credit_card(rng)
        assert _luhn_ok(card) and len([c for c in card if c.isdigit()]) in (15, 16)
        iban, _fmt = ev.iban(rng)
        compact = iban.replace(" ", "")
        assert int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1
        phone, fmt = ev.phone(rng)
        region = fmt.split("/")[0]
        number = phonenumbers.parse(re.sub(r"[^\d+()]+", " ", phone), region)  # any separator read as a space
        assert phonenumbers.is_valid_number(number), (phone, fmt)


def test_formats_cover_the_issue_list() -> None:
    rng = random.Random(3)
    formats = {entity: {gen(rng)[1] for _ in range(400)} for entity, gen in ev.GENERATORS.items()}
    assert {f.split("/")[1] for f in formats["US_SSN"]} == {"dash", "space", "none"}
    assert {"area_000", "area_666", "area_9xx", "sample"} <= {f.split("/")[0] for f in formats["US_SSN"]}
    assert {"visa", "mastercard", "amex", "discover"} <= {f.split("/")[0] for f in formats["CREDIT_CARD"]}
    assert {"US", "GB", "DE", "FI"} == {f.split("/")[0] for f in formats["PHONE_NUMBER"]}
    assert {"dotted", "international", "national", "e164", "intl_en_dash", "intl_nbsp", "intl_misdecoded"} <= {
        f.split("/")[1] for f in formats["PHONE_NUMBER"]
    }
    assert {"plus/subdomain", "plain/domain"} <= formats["EMAIL_ADDRESS"]
    assert {"spaced", "unspaced"} == {f.split("/")[1] for f in formats["IBAN_CODE"]}


def test_dev_and_eval_templates_are_disjoint_and_well_formed() -> None:
    for entity, splits in ev.TEMPLATES.items():
        assert not set(splits["dev"]) & set(splits["eval"]), entity
        assert all(t.count(ev.PLACEHOLDER) == 1 for t in splits["dev"] + splits["eval"])
    cases = ev.build_cases("eval", 2, seed=1)
    assert cases == ev.build_cases("eval", 2, seed=1)
    assert all(c.text[c.start:c.start + len(c.value)] == c.value for c in cases)


@pytest.mark.parametrize(
    ("redacted", "leaked"),
    [
        ("Pay card <CREDIT_CARD> now.", False),
        ("Pay card 4111 1<CREDIT_CARD> now.", False),  # five digits left: under the six-digit rule
        ("Pay card <CREDIT_CARD> 1111 1111 now.", True),  # partial mask: 8 digits left
        ("Pay card 4111 1111 1111 1111 now.", True),
    ],
)
def test_partial_mask_leaving_six_digits_is_a_leak(redacted: str, leaked: bool) -> None:
    text = "Pay card 4111 1111 1111 1111 now."
    case = ev.Case(text, "4111 1111 1111 1111", 9, "CREDIT_CARD", "visa/space", text, "eval")
    assert ev.leaks(case, redacted) is leaked


def test_held_out_templates_are_fully_masked(guard: PIIGuard) -> None:
    report = ev.score_cases(guard, ev.build_cases("eval", 4, seed=11))
    assert report["leak_rate"] == 0
    assert report["min_recall"] == 1.0, report["per_entity"]


def test_clean_alterations_counts_changed_sentences_only(guard: PIIGuard) -> None:
    texts = ["Sales rose 4 % to EUR 9.8 mn in 2008 .", "Contact tel. +358 9 7597 0711 for details ."]
    report = ev.clean_alterations(guard, texts)
    assert (report["altered"], report["altered_indices"], report["altered_by_type"]) == (1, [1], {"PHONE_NUMBER": 1})
