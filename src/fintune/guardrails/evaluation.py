"""guard-eval: a synthetic set of financial sentences carrying PII, and the figures the guard is held to.

The set is generated, never downloaded: per entity type, sentence templates (split into *development*
templates, used while writing the recognizers, and held-out *evaluation* templates, used for the reported
figures) are filled with values in many formats (SSNs with dashes, spaces or none and "invalid" areas; Luhn-valid
Visa / Mastercard / Amex / Discover in several groupings; emails with plus-addressing and subdomains; valid US,
UK, German and Finnish phone numbers in national, international, E.164 and dotted forms, and international ones
whose separators are an en dash, a no-break space or a mis-decoded dash (as in the PhraseBank); IBANs with valid check
digits, spaced and unspaced; account and routing numbers after context words).

Measured per sentence: *recall* (every character of the value lies in a detected span of an accepted type),
*leak* (the redacted text still holds the value, its email local part, or 6+ consecutive digits of it), the
fraction of clean sentences altered, and latency one by one and batched.
"""

from __future__ import annotations

import random
import re
import statistics
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import phonenumbers
import presidio_analyzer
import yaml
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from presidio_analyzer import AnalyzerEngine
from presidio_analyzer.nlp_engine import NlpEngineProvider
from presidio_analyzer.recognizer_registry import RecognizerRegistryProvider

from fintune.config import GuardrailSettings
from fintune.guardrails.engine import PIIGuard
from fintune.guardrails.recognizers import OfflineEmailRecognizer

PLACEHOLDER = "{pii}"


@dataclass(frozen=True)
class Case:
    """One synthetic sentence: where the PII value sits, its type and format, and which template made it."""

    text: str
    value: str
    start: int
    entity: str
    value_format: str
    template: str
    split: str


Generator = Callable[[random.Random], tuple[str, str]]


# --- value generators: (value, format name) -------------------------------------------------------------------


def _digits(rng: random.Random, n: int) -> str:
    """``n`` random decimal digits."""
    return "".join(rng.choice(string.digits) for _ in range(n))


def ssn(rng: random.Random) -> tuple[str, str]:
    """A 3-2-4 SSN, sometimes one Presidio calls invalid (000/666/9xx areas, published samples)."""
    kind = rng.choice(["valid", "valid", "area_000", "area_666", "area_9xx", "sample"])
    if kind == "sample":
        area, group, serial = rng.choice([("123", "45", "6789"), ("078", "05", "1120")])
    else:
        area = {"area_000": "000", "area_666": "666", "area_9xx": "9" + _digits(rng, 2)}.get(
            kind, f"{rng.randint(1, 665):03d}"
        )
        group, serial = f"{rng.randint(1, 99):02d}", f"{rng.randint(1, 9999):04d}"
    sep = rng.choice(["-", " ", ""])
    return sep.join([area, group, serial]), f"{kind}/{'dash' if sep == '-' else 'space' if sep else 'none'}"


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    """``prefix`` padded with random digits to ``length`` with a valid Luhn check digit."""
    body = prefix + _digits(rng, length - len(prefix) - 1)
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def credit_card(rng: random.Random) -> tuple[str, str]:
    """A Luhn-valid Visa, Mastercard, Amex or Discover number in one of its usual groupings."""
    brand = rng.choice(["visa", "mastercard", "mastercard2", "amex", "discover"])
    prefix, length = {
        "visa": ("4", 16), "mastercard": (str(rng.randint(51, 55)), 16),
        "mastercard2": (str(rng.randint(2221, 2720)), 16), "amex": (rng.choice(["34", "37"]), 15),
        "discover": ("6011", 16),
    }[brand]
    number = _luhn_complete(prefix, length, rng)
    groups = (4, 6, 5) if length == 15 else (4, 4, 4, 4)
    sep = rng.choice([" ", "-", ""])
    parts, i = [], 0
    for size in groups:
        parts.append(number[i:i + size])
        i += size
    return sep.join(parts), f"{brand}/{'dash' if sep == '-' else 'space' if sep else 'none'}"


_FIRST = ["anna", "mikko", "john", "maria", "li", "oskar", "sara", "david", "eeva", "tom"]
_LAST = ["virtanen", "smith", "mueller", "korhonen", "garcia", "brown", "nieminen", "wang"]
_DOMAINS = ["example.com", "mail.example.co.uk", "corp.example.de", "invest.example.fi", "ir.example.org",
            "eu.mail.example.net", "example.io"]


def email(rng: random.Random) -> tuple[str, str]:
    """An address with dots, digits, plus-addressing and subdomains in various mixes."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = rng.choice([f"{first}.{last}", f"{first}{rng.randint(1, 99)}", f"{first[0]}{last}", f"{first}_{last}"])
    kind = "plain"
    if rng.random() < 0.4:
        local += "+" + rng.choice(["ir", "invest", "q3", "newsletter"])
        kind = "plus"
    domain = rng.choice(_DOMAINS)
    return f"{local}@{domain}", f"{kind}/{'subdomain' if domain.count('.') > 1 else 'domain'}"


_PHONE_TYPES = (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE)


def _valid_number(region: str, rng: random.Random) -> phonenumbers.PhoneNumber:
    """A random valid number of ``region`` made by varying the last digits of libphonenumber's example."""
    example = phonenumbers.example_number_for_type(region, rng.choice(_PHONE_TYPES))
    national = str(example.national_number)
    for _ in range(100):
        candidate = national[:-4] + _digits(rng, 4)
        number = phonenumbers.parse("+" + str(example.country_code) + candidate)
        if phonenumbers.is_valid_number(number):
            return number
    return example


# Separators that text extraction leaves in numbers: an en dash, a no-break space, and a dash followed by the
# stray character of a mis-decoded one (the PhraseBank holds "+1 617-\u00e1801-\u00e16888").
_UNICODE_SEPARATORS = {"en_dash": "\u2013", "nbsp": "\u00a0", "misdecoded": "-\u00e1"}


def phone(rng: random.Random) -> tuple[str, str]:
    """A valid US, UK, German or Finnish number: national, international, E.164, dotted or non-ASCII separated."""
    region = rng.choice(["US", "GB", "DE", "FI"])
    number = _valid_number(region, rng)
    style = rng.choice(["national", "international", "e164", "dotted", "intl_dotted", "intl_unicode"])
    if style in ("national", "international", "e164"):
        fmt = {"national": PhoneNumberFormat.NATIONAL, "international": PhoneNumberFormat.INTERNATIONAL,
               "e164": PhoneNumberFormat.E164}[style]
        return phonenumbers.format_number(number, fmt), f"{region}/{style}"
    national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
    groups = re.findall(r"\d+", national)
    if style == "dotted":
        return ".".join(groups), f"{region}/dotted"
    intl = re.findall(r"\d+", phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL))
    if style == "intl_dotted":
        return "+" + ".".join(intl), f"{region}/intl_dotted"
    name, separator = rng.choice(sorted(_UNICODE_SEPARATORS.items()))
    return f"+{intl[0]} " + separator.join(intl[1:]), f"{region}/intl_{name}"


_IBAN_LAYOUT = {"DE": "n18", "FI": "n14", "GB": "a4n14", "NL": "a4n10", "FR": "n10a11n2", "SE": "n20"}


def iban(rng: random.Random) -> tuple[str, str]:
    """An IBAN with valid ISO 7064 check digits, spaced in groups of four or unspaced."""
    country = rng.choice(sorted(_IBAN_LAYOUT))
    bban = ""
    for kind, count in re.findall(r"([an])(\d+)", _IBAN_LAYOUT[country]):
        alphabet = string.ascii_uppercase if kind == "a" else string.digits
        if kind == "a" and country == "FR":
            alphabet = string.ascii_uppercase + string.digits
        bban += "".join(rng.choice(alphabet) for _ in range(int(count)))
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    check = 98 - int(numeric) % 97
    value = f"{country}{check:02d}{bban}"
    spaced = rng.random() < 0.5
    if spaced:
        value = " ".join(value[i:i + 4] for i in range(0, len(value), 4))
    return value, f"{country}/{'spaced' if spaced else 'unspaced'}"


def account_number(rng: random.Random) -> tuple[str, str]:
    """An 8-12 digit account number, plain, dashed or with leading zeros."""
    style = rng.choice(["plain", "leading_zeros", "dashed"])
    if style == "leading_zeros":
        return "00" + _digits(rng, rng.randint(6, 10)), style
    digits = str(rng.randint(1, 9)) + _digits(rng, rng.randint(7, 11))
    if style == "dashed":
        return f"{digits[:2]}-{digits[2:-2]}-{digits[-2:]}", style
    return digits, style


def routing_number(rng: random.Random) -> tuple[str, str]:
    """A nine-digit ABA routing number, checksum-valid or not."""
    body = f"{rng.choice('0123678')}{_digits(rng, 7)}"
    weights = (3, 7, 1, 3, 7, 1, 3, 7)
    check = (10 - sum(int(d) * w for d, w in zip(body, weights, strict=True)) % 10) % 10
    valid = rng.random() < 0.7
    return body + str(check if valid else (check + 1) % 10), "checksum_valid" if valid else "checksum_invalid"


# --- templates: development (tuned on) and evaluation (held out) --------------------------------------------

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "US_SSN": {
        "dev": [
            "Client SSN {pii} was attached to the Q3 2024 margin loan application.",
            "Please verify social security number {pii} before releasing the EUR 2.5 mn payout.",
            "The investor's SSN: {pii}; holdings rose 12 % in 2023.",
            "Soc. Sec. No. {pii} appears on the 1099 for the USD 3,400 distribution.",
            "SS# {pii} was missing from the W-9, delaying the EUR 800 refund.",
        ],
        "eval": [
            "Tax form lists the shareholder's Social Security No. {pii} next to the 2022 dividend of USD 1,250.",
            "KYC check failed for ssn {pii}, so the 401(k) rollover of $48,000 is on hold.",
            "Beneficiary social security # {pii} must match the trust account opened in Q1.",
            "Our records show SSN#{pii} for the account holder; net asset value fell 3.4 % last quarter.",
        ],
    },
    "CREDIT_CARD": {
        "dev": [
            "Charge the USD 499 subscription to card {pii} before the Q2 close.",
            "The corporate card {pii} was used for EUR 3,200 of travel in 2023.",
            "Refund of $75.10 issued to {pii} on March 3.",
        ],
        "eval": [
            "Customer disputed a 2.9 % FX fee on credit card number {pii} billed in GBP.",
            "Payment of EUR 18.5 mn settled; the fee was paid with {pii} at the end of Q4 2022.",
            "Visa ending transaction {pii} shows a EUR 120 charge that the client does not recognise.",
            "Please update the card on file to {pii}; the old one expired in 2024.",
        ],
    },
    "EMAIL_ADDRESS": {
        "dev": [
            "Send the Q3 earnings deck to {pii} by Friday.",
            "Investor relations contact: {pii}, revenue up 8 % year on year.",
            "The analyst ({pii}) raised the target price to EUR 14.5.",
        ],
        "eval": [
            "Questions about the EUR 300 mn bond issue can be emailed to {pii} until 15 June.",
            "Please cc {pii} on the 2024 guidance revision.",
            "Subscription confirmed for {pii}: quarterly dividend alerts in USD and EUR.",
            "The whistle-blower wrote from {pii} about the Q1 2023 restatement.",
        ],
    },
    "PHONE_NUMBER": {
        "dev": [
            "For the EUR 50 mn rights issue call {pii} during office hours.",
            "Contact our trading desk at {pii}; shares rose 4.2 % on Monday.",
            "Client mobile: {pii}, portfolio down 1.8 % in Q2.",
            "Tel. {pii} for the placement desk handling the EUR 12 mn issue.",
        ],
        "eval": [
            "The broker left a voicemail from {pii} about the USD 2.1 bn acquisition.",
            "Dial {pii} to confirm the wire of EUR 12,500 scheduled for 2024.",
            "Investor hotline {pii} is open until the AGM on 24 April.",
            "Reach the CFO's office on {pii} regarding the 15 % margin target.",
        ],
    },
    "IBAN_CODE": {
        "dev": [
            "Please transfer EUR 1,200 to IBAN {pii} by the end of Q3.",
            "Dividends of USD 0.45 per share are paid to {pii}.",
            "The supplier's bank details changed to {pii} in 2023.",
        ],
        "eval": [
            "Refund the EUR 89.90 overcharge to the customer's IBAN: {pii}.",
            "Settlement of the 2024 coupon goes to {pii} at Nordea.",
            "Beneficiary {pii} received SEK 25,000 in the first quarter.",
            "Update the payroll record to {pii} before the 3 % salary increase takes effect.",
        ],
    },
    "ACCOUNT_NUMBER": {
        "dev": [
            "Wire USD 25,000 to account {pii} before the Q3 cut-off.",
            "Client acct # {pii} gained 6.3 % in 2023.",
            "Funds from a/c no. {pii} were moved to the money-market fund.",
            "Acct. No. {pii} shows a margin call after the 7 % fall.",
        ],
        "eval": [
            "The brokerage account number {pii} holds EUR 1.2 mn in Finnish equities.",
            "Debit the EUR 45 fee from checking account {pii} on the first business day of Q2.",
            "Margin call issued on acct {pii} after the 9 % drop in the share price.",
            "Transfer the 2024 dividend to savings account no. {pii} at the end of June.",
        ],
    },
    "ABA_ROUTING_NUMBER": {
        "dev": [
            "Use routing number {pii} for the USD 10,000 ACH transfer.",
            "ABA {pii}, account on file, payment due in Q4.",
        ],
        "eval": [
            "The bank's routing no. {pii} appears on the 2023 wire confirmation for $7,500.",
            "Direct deposit requires the ABA routing number {pii} and the account number.",
            "Payroll run failed: RTN {pii} was rejected after the 2 % fee change.",
        ],
    },
}
"""Per entity type, development and evaluation templates; each holds ``{pii}`` once."""

GENERATORS: dict[str, Generator] = {
    "US_SSN": ssn, "CREDIT_CARD": credit_card, "EMAIL_ADDRESS": email, "PHONE_NUMBER": phone,
    "IBAN_CODE": iban, "ACCOUNT_NUMBER": account_number, "ABA_ROUTING_NUMBER": routing_number,
}
"""How the values of each entity type are made."""

ACCEPTED_TYPES: dict[str, frozenset[str]] = {
    "ACCOUNT_NUMBER": frozenset({"ACCOUNT_NUMBER", "US_BANK_NUMBER"}),
}
"""Detected types that count as a hit for a generated type besides itself (a bank account is an account)."""


def build_cases(split: str, samples_per_template: int, seed: int) -> list[Case]:
    """The synthetic sentences of ``split`` ("dev" or "eval"), deterministic for a seed."""
    rng = random.Random(f"{seed}/{split}")
    cases = []
    for entity, splits in TEMPLATES.items():
        for template in splits[split]:
            head, tail = template.split(PLACEHOLDER)
            for _ in range(samples_per_template):
                value, value_format = GENERATORS[entity](rng)
                cases.append(Case(head + value + tail, value, len(head), entity, value_format, template, split))
    return cases


# --- scoring -------------------------------------------------------------------------------------------------


def is_recalled(case: Case, spans: Sequence[Any]) -> bool:
    """Every non-separator character of the value lies in a detected span of an accepted type."""
    accepted = ACCEPTED_TYPES.get(case.entity, frozenset()) | {case.entity}
    covered = set()
    for span in spans:
        if span.entity_type in accepted:
            covered.update(range(span.start, span.end))
    return all(i in covered for i, ch in enumerate(case.value, case.start) if ch.isalnum())


_DIGIT_RUN = re.compile(r"\d(?:[ \-.()/]{0,2}\d)*")


def leaks(case: Case, redacted_text: str) -> bool:
    """The redacted text still shows the value, its email local part, or 6+ consecutive digits of it."""
    if case.value in redacted_text:
        return True
    if "@" in case.value and case.value.split("@")[0] in redacted_text:
        return True
    digits = re.sub(r"\D", "", case.value)
    windows = {digits[i:i + 6] for i in range(len(digits) - 5)}
    runs = (re.sub(r"\D", "", m.group()) for m in _DIGIT_RUN.finditer(redacted_text))
    return any(run[i:i + 6] in windows for run in runs for i in range(len(run) - 5))


def score_cases(guard: PIIGuard, cases: Sequence[Case]) -> dict[str, Any]:
    """Recall and leak rate per entity type and overall; misses listed by type and format (no values)."""
    spans_per_case = guard.detect_batch([case.text for case in cases])
    results = [guard.mask(case.text, spans) for case, spans in zip(cases, spans_per_case, strict=True)]
    per_entity: dict[str, dict[str, Any]] = {}
    for case, spans, result in zip(cases, spans_per_case, results, strict=True):
        row = per_entity.setdefault(case.entity, {"n": 0, "recalled": 0, "leaked": 0, "missed_formats": {}})
        row["n"] += 1
        hit, leaked = is_recalled(case, spans), leaks(case, result.redacted_text)
        row["recalled"] += hit
        row["leaked"] += leaked
        if not hit or leaked:
            row["missed_formats"][case.value_format] = row["missed_formats"].get(case.value_format, 0) + 1
    for row in per_entity.values():
        row["recall"] = round(row["recalled"] / row["n"], 4)
        row["leak_rate"] = round(row["leaked"] / row["n"], 4)
    total = sum(row["n"] for row in per_entity.values())
    return {
        "sentences": total,
        "templates": len({case.template for case in cases}),
        "min_recall": min(row["recall"] for row in per_entity.values()),
        "leak_rate": round(sum(row["leaked"] for row in per_entity.values()) / total, 4),
        "per_entity": dict(sorted(per_entity.items())),
    }


def clean_alterations(guard: PIIGuard, texts: Sequence[str]) -> dict[str, Any]:
    """How many clean sentences the guard changes, and which types it (wrongly) found; no sentence text."""
    results = guard.redact_batch(texts)
    altered = [(i, r.pii_types) for i, r in enumerate(results) if r.redacted_text != texts[i]]
    types: dict[str, int] = {}
    for _, found in altered:
        for entity in found:
            types[entity] = types.get(entity, 0) + 1
    return {
        "sentences": len(texts),
        "altered": len(altered),
        "altered_fraction": round(len(altered) / max(len(texts), 1), 5),
        "altered_by_type": dict(sorted(types.items())),
        "altered_indices": [i for i, _ in altered],
    }


def latency(guard: PIIGuard, texts: Sequence[str], samples: int) -> dict[str, Any]:
    """Milliseconds per sentence one by one (p50/p99/mean) and batched (mean), over the same sentences."""
    chosen = [texts[i % len(texts)] for i in range(samples)]
    guard.redact(chosen[0])  # warm-up
    timings = []
    for text in chosen:
        start = time.perf_counter()
        guard.redact(text)
        timings.append((time.perf_counter() - start) * 1000.0)
    start = time.perf_counter()
    guard.redact_batch(chosen)
    batch_ms = (time.perf_counter() - start) * 1000.0 / len(chosen)
    return {
        "sentences": len(chosen),
        "p50_ms": round(float(np.percentile(timings, 50)), 3),
        "p99_ms": round(float(np.percentile(timings, 99)), 3),
        "mean_ms": round(statistics.fmean(timings), 3),
        "batch_mean_ms": round(batch_ms, 3),
        "batch_size": guard.settings.batch_size,
        "batch_speedup": round(statistics.fmean(timings) / batch_ms, 2),
    }


# --- the baseline: Presidio's own defaults --------------------------------------------------------------------

PRESIDIO_PII_ONLY = ("US_SSN", "CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE", "US_BANK_NUMBER")
"""The issue's PII entity set, restricted to types Presidio's default registry knows."""


def presidio_defaults_guard(settings: GuardrailSettings, pii_only: bool) -> PIIGuard:
    """A guard as ``AnalyzerEngine()`` builds it (default NLP configuration and registry, threshold 0).

    Two changes only: the configured spaCy model replaces ``en_core_web_lg``, and the email recognizer is the
    offline one, so that the baseline, too, never touches the network. ``pii_only`` restricts it to
    :data:`PRESIDIO_PII_ONLY`; otherwise every default entity is masked.
    """
    conf_file = Path(presidio_analyzer.__file__).parent / "conf" / "default.yaml"
    nlp_configuration = yaml.safe_load(conf_file.read_text(encoding="utf-8"))
    nlp_configuration["models"] = [{"lang_code": settings.language, "model_name": settings.spacy_model}]
    nlp_engine = NlpEngineProvider(nlp_configuration=nlp_configuration).create_engine()
    provider = RecognizerRegistryProvider(registry_configuration={"supported_languages": [settings.language]})
    registry = provider.create_recognizer_registry()
    registry.add_nlp_recognizer(nlp_engine=nlp_engine)
    registry.remove_recognizer("EmailRecognizer")
    registry.add_recognizer(OfflineEmailRecognizer(supported_language=settings.language))
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[settings.language])
    entities = list(PRESIDIO_PII_ONLY) if pii_only else sorted(analyzer.get_supported_entities(settings.language))
    return PIIGuard(settings.model_copy(update={"entities": entities}), analyzer)
