"""FinTune's own Presidio recognizers: the formats Presidio's defaults let through, and offline email checks.

Each class is a declarative :class:`presidio_analyzer.PatternRecognizer` (patterns, context words, entity), in
the style of Presidio's ``us_ssn_recognizer.py``. Presidio matches patterns with the ``regex`` module, so the
context-anchored patterns use variable-width look-behinds: only the number itself is masked, never the word
"account" or "SSN" in front of it. :func:`build_recognizers` returns the full set the engine registers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import regex
import tldextract
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
    UsBankRecognizer,
    UsSsnRecognizer,
)

# A label word, then optional filler ("number", "no.", "#", ":", "is"), right before the value. Whitespace runs
# are bounded: an unbounded \s* inside this look-behind made a long run of spaces cost quadratic time (8,000
# spaces then a digit: 20 s).
_FILLER = r"(?:\s{0,5}(?:number|numbers|num|no\.?|nr\.?|\#|:|is|was|of|ending\s{1,5}in)\s{0,5}){0,3}\s{0,5}"
# A run of digits with optional single separators, ending on a digit.
_DIGITS = r"\d(?:[ \-.]?\d){{{low},{high}}}"
# A phone number's group separator: a space, dash or dot, a non-ASCII one (en dash, no-break space), or a dash
# followed by a stray non-ASCII character, which is how a mis-decoded separator reads ("+1 617-\u00e1801-\u00e16888").
_PHONE_SEP = r"(?:[ \-.][^\x00-\x7F]?|[^\x00-\x7F\w])"


def _after(words: str, value: str) -> str:
    """A pattern matching ``value`` only when it follows one of ``words`` (case-insensitive, word-bounded).

    A label ending in a letter must end a word ("tel", not "telling"); one ending in "." or "#" ("tel.",
    "ss#") may be followed by anything: a word boundary there would demand a letter or digit next, and
    "Tel. 123 4567" or "SS# 219099999" would pass unmasked.
    """
    return rf"(?<=\b(?:{words})(?:(?<=\w)(?!\w)|(?<!\w)){_FILLER})(?<![\w])({value})(?![\w])"


class DeclarativeRecognizer(PatternRecognizer):
    """A pattern recognizer defined by class attributes: ``ENTITY``, ``PATTERNS`` and ``CONTEXT`` words."""

    ENTITY: str
    PATTERNS: list[Pattern]
    CONTEXT: list[str]

    def __init__(self, supported_language: str = "en") -> None:
        """Register the class's patterns and context words for ``supported_language``."""
        super().__init__(
            supported_entity=self.ENTITY,
            patterns=self.PATTERNS,
            context=self.CONTEXT,
            supported_language=supported_language,
            name=type(self).__name__,
        )


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recognizer whose domain check uses tldextract's bundled suffix list, never the network."""

    _EXTRACT = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    def validate_result(self, pattern_text: str) -> bool:
        """True when the domain after the "@" ends in a known public suffix (bundled Public Suffix List snapshot).

        Only the domain is parsed: the whole match read as a URL loses its domain to a "?" or "/" in the local part
        (the pattern allows both), and "/v1/classify?contact=john.doe@example.com" in an access log went unmasked.
        """
        return self._EXTRACT(pattern_text.rpartition("@")[2]).fqdn != ""


class FinancialCreditCardRecognizer(CreditCardRecognizer):
    """Presidio's Luhn-checked card recognizer, minus numbers written with a leading "+": those are
    international phone numbers (a German mobile in E.164 can pass the Luhn check), never cards."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        """Presidio's card matches not written right after a "+" ("+ " is a list bullet, not a phone prefix)."""
        results = super().analyze(text, entities, nlp_artifacts)
        return [r for r in results if not text[:r.start].endswith("+")]


class Mastercard2SeriesRecognizer(FinancialCreditCardRecognizer):
    """Mastercard's 2221-2720 range, which Presidio's card pattern lacks; Luhn-checked like every card."""

    PATTERNS = [
        Pattern("Mastercard 2-series", r"\b2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)(?:[ \-]?\d{4}){3}\b", 0.3),
    ]

    def __init__(self, supported_language: str = "en") -> None:
        """Presidio's card recognizer (context words, Luhn check) with the 2-series pattern."""
        super().__init__(
            patterns=self.PATTERNS, supported_language=supported_language, name="Mastercard2SeriesRecognizer"
        )


class DottedCardRecognizer(FinancialCreditCardRecognizer):
    """Card numbers grouped with dots ("4111.1111.1111.1111", Amex "3782.822463.10005"), which Presidio's
    pattern lacks; Luhn-checked like every card (the dots are dropped before the check)."""

    PATTERNS = [
        Pattern("16 digits in dotted fours", r"\b\d{4}\.\d{4}\.\d{4}\.\d{4}\b", 0.3),
        Pattern("Amex, dotted 4-6-5", r"\b3[47]\d{2}\.\d{6}\.\d{5}\b", 0.3),
    ]

    def __init__(self, supported_language: str = "en") -> None:
        """Presidio's card recognizer (context words, Luhn check) with the dotted patterns."""
        super().__init__(
            patterns=self.PATTERNS, supported_language=supported_language, name="DottedCardRecognizer",
            replacement_pairs=[("-", ""), (" ", ""), (".", "")],
        )


_NOT_AFTER_A_NUMBER = r"(?<!\d)(?<!\d[\-.])"
_NOT_BEFORE_A_NUMBER = r"(?!\d|[\-.]\d)"
"""No digit, nor a separator and a digit, on that side: the match is a whole number, not part of a longer one."""
_LONG_CARD_ISSUER = r"(?=4|5[06-9]|6|35|220[0-4])"
"""The issuers of 17-19 digit cards: Visa (4), Maestro (50, 56-69), UnionPay (62), Discover (6011, 64, 65), JCB (35)
and Mir (2200-2204). Without it, Luhn alone passed one in ten long numbers (nanosecond timestamps, IDs)."""


class LongCardRecognizer(FinancialCreditCardRecognizer):
    """Cards of 17 to 19 digits (Visa and UnionPay issue 19, Maestro up to 19), which Presidio's pattern stops
    short of: unbroken, or four groups of four and the rest; Luhn-checked like every card."""

    PATTERNS = [
        Pattern("17-19 digits", rf"{_NOT_AFTER_A_NUMBER}{_LONG_CARD_ISSUER}\d{{17,19}}{_NOT_BEFORE_A_NUMBER}", 0.3),
        Pattern("4-4-4-4 and 1-3 more",
                rf"{_NOT_AFTER_A_NUMBER}{_LONG_CARD_ISSUER}\d{{4}}([ \-])\d{{4}}\1\d{{4}}\1\d{{4}}\1\d{{1,3}}"
                rf"{_NOT_BEFORE_A_NUMBER}", 0.3),
    ]

    def __init__(self, supported_language: str = "en") -> None:
        """Presidio's card recognizer (context words, Luhn check) with the long-card patterns."""
        super().__init__(patterns=self.PATTERNS, supported_language=supported_language, name="LongCardRecognizer")


class CaseBlindIbanRecognizer(IbanRecognizer):
    """Presidio's IBAN recognizer (format and check digits), also for IBANs typed in lower or mixed case
    ("de89 3704 ...", "gb82 west 1234 ...").

    Only what could be an IBAN is upper-cased for it, one ASCII letter for one, so offsets are unchanged: a word
    that holds a digit, and the letters-only groups right after a country code and check digits (a bank code such
    as "west" or "abna"); other words stay as they are and never join a candidate."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None, regex_flags: int | None = None
    ) -> list[RecognizerResult]:
        """Presidio's matches in the text with its alphanumeric words upper-cased."""
        upper = _IBAN_START.sub(_ascii_upper, _WORD_WITH_DIGIT.sub(_ascii_upper, text))
        return super().analyze(upper, entities, nlp_artifacts, regex_flags)


_WORD_WITH_DIGIT = re.compile(r"\b(?=[A-Za-z]*\d)[A-Za-z0-9]+\b")
_IBAN_START = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z]{4}\b)?")
"""A country code and check digits, with a letters-only bank code group after them (British, Dutch IBANs)."""
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def _ascii_upper(match: re.Match[str]) -> str:
    """The matched word with its ASCII letters upper-cased (the same length)."""
    return match.group().translate(_ASCII_UPPER)


class FinancialPhoneRecognizer(PhoneRecognizer):
    """Presidio's python-phonenumbers recognizer minus what financial text is full of: short numbers
    ("founded in 1649", "EUR 164.7 mn"), decimal figures ("46.3 35.8"), dotted dates and Finnish business IDs."""

    MIN_DIGITS = 7
    NOT_A_PHONE = [
        regex.compile(r"(?<![\d.])\d{1,3}\.\d{1,2}(?![\d]|\.\d)"),  # a decimal figure: 164.7, 46.3
        regex.compile(r"^\d{1,2}\.\d{1,2}\.(?:19|20)\d{2}$"),  # a dotted date: 04.01.2006
        regex.compile(r"^\d{7}-\d$"),  # a Finnish business ID (Y-tunnus): 0187274-0
    ]

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        """Presidio's matches, without the ones that read as amounts, dates or company IDs."""
        if count_digits(text) < self.MIN_DIGITS:
            return []  # python-phonenumbers is the guard's slowest part; no match could pass is_plausible
        results = super().analyze(text, entities, nlp_artifacts)
        return [r for r in results if self.is_plausible(text[r.start:r.end])]

    def is_plausible(self, matched: str) -> bool:
        """At least seven digits and no decimal figure, dotted date or business ID in the match."""
        if count_digits(matched) < self.MIN_DIGITS:
            return False
        return not any(pattern.search(matched) for pattern in self.NOT_A_PHONE)


class ContextSsnRecognizer(DeclarativeRecognizer):
    """SSN-shaped numbers (3-2-4 digits, any or no separator) after "SSN" / "social security": PII whatever
    their validity, unlike Presidio's recognizer, which drops 123-45-6789, 078-05-1120 and 000/666/9xx areas."""

    ENTITY = "US_SSN"
    PATTERNS = [
        Pattern(
            "SSN after its label",
            _after(r"ssn|ssns|ss\#|social\s{1,5}security|soc\.?\s{1,5}sec\.?|taxpayer\s{1,5}id|tin",
                   r"\d{3}([ \-.]?)\d{2}\2\d{4}"),
            0.85,
        ),
        Pattern("SSN dashed, any validity", r"(?<![\w\-])\d{3}-\d{2}-\d{4}(?![\w\-])", 0.5),
    ]
    CONTEXT = ["ssn", "social", "security", "taxpayer"]


class ExtraPhoneRecognizer(DeclarativeRecognizer):
    """Phone formats python-phonenumbers misses: dotted groups, +CC numbers with odd grouping or non-ASCII
    (or mis-decoded) separators, and any 7-15 digit number right after a phone word."""

    ENTITY = "PHONE_NUMBER"
    MIN_DIGITS, MAX_DIGITS = 7, 15  # E.164's limits
    PATTERNS = [
        Pattern(
            "international +CC",
            rf"(?<![\w+])\+\d{{1,3}}(?:{_PHONE_SEP}?\(?0?\d{{1,4}}\)?)(?:{_PHONE_SEP}?\d{{2,5}}){{1,4}}(?![\w])",
            0.6,
        ),
        Pattern("dotted 3.3.4", r"(?<![\w.])\(?\d{3}\)?\.\d{3}\.\d{4}(?![\w]|\.\d)", 0.6),
        Pattern(
            "number after a phone word",
            _after(r"phone|telephone|tel\.?|mobile|cell|cellphone|fax|call|ring|text|whatsapp|reach\s{1,5}me\s{1,5}(?:at|on)",
                   r"\+?\(?\d(?:[ \-./()]{0,2}\d){6,14}"),
            0.7,
        ),
    ]
    CONTEXT = ["phone", "telephone", "mobile", "call", "tel", "cell", "fax"]

    def validate_result(self, pattern_text: str) -> bool | None:
        """Reject matches with fewer than 7 or more than 15 digits (E.164's limits), counted as ``\\d`` counts
        them (``str.isdigit`` would count superscripts too)."""
        digits = count_digits(pattern_text)
        return None if self.MIN_DIGITS <= digits <= self.MAX_DIGITS else False


class AccountNumberRecognizer(DeclarativeRecognizer):
    """Account numbers in financial phrasing: "account 0012345678", "acct # 12-3456-78", "a/c no. 98765432"."""

    ENTITY = "ACCOUNT_NUMBER"
    PATTERNS = [
        Pattern(
            "number after an account word",
            _after(r"account|accounts|acct\.?|acc\.?|a/c|brokerage|portfolio\s{1,5}id|customer\s{1,5}id|client\s{1,5}id",
                   _DIGITS.format(low=5, high=33)),
            0.75,
        ),
    ]
    CONTEXT = ["account", "acct", "a/c"]


class RoutingNumberRecognizer(DeclarativeRecognizer):
    """Nine-digit bank routing numbers after "routing", "ABA" or "RTN", checksum-valid or not."""

    ENTITY = "ABA_ROUTING_NUMBER"
    PATTERNS = [
        Pattern(
            "number after a routing word",
            _after(r"routing|aba|rtn|transit|sort\s{1,5}code|swift\s{1,5}routing", _DIGITS.format(low=5, high=10)),
            0.8,
        ),
    ]
    CONTEXT = ["routing", "aba", "rtn", "transit"]


_DIGIT = re.compile(r"\d")


def count_digits(text: str) -> int:
    """How many decimal digits (any script: what ``\\d`` matches in the recognizers' patterns) ``text`` holds."""
    return len(_DIGIT.findall(text))


@dataclass(frozen=True)
class Evidence:
    """What every span a recognizer can flag holds: at least ``min_digits`` digits and each of ``characters``."""

    min_digits: int = 0
    characters: str = ""

    def present_in(self, text: str, digits: int) -> bool:
        """True when ``text``, holding ``digits`` digits, could contain a span of this recognizer."""
        return digits >= self.min_digits and all(char in text for char in self.characters)


ALWAYS_RUN = Evidence()
"""The evidence of a recognizer not in :data:`EVIDENCE` (Presidio's NER, a user's own): run on every text."""

EVIDENCE: dict[str, Evidence] = {
    # SSN shapes are 3-2-4, 5-4, 3-6 or 9 digits in a row
    "UsSsnRecognizer": Evidence(min_digits=9),
    "ContextSsnRecognizer": Evidence(min_digits=9),
    # Presidio's card pattern: 4 + 3 + 3 + 3 digits at least; the 2-series 16; dotted Amex 4 + 6 + 5
    "FinancialCreditCardRecognizer": Evidence(min_digits=13),
    "Mastercard2SeriesRecognizer": Evidence(min_digits=16),
    "DottedCardRecognizer": Evidence(min_digits=15),
    "LongCardRecognizer": Evidence(min_digits=17),
    "OfflineEmailRecognizer": Evidence(characters="@"),
    # both phone recognizers drop matches with fewer than 7 digits (is_plausible, validate_result)
    "FinancialPhoneRecognizer": Evidence(min_digits=FinancialPhoneRecognizer.MIN_DIGITS),
    "ExtraPhoneRecognizer": Evidence(min_digits=ExtraPhoneRecognizer.MIN_DIGITS),
    # two letters, then the two check digits; the rest may be letters
    "CaseBlindIbanRecognizer": Evidence(min_digits=2),
    "UsBankRecognizer": Evidence(min_digits=8),
    "AccountNumberRecognizer": Evidence(min_digits=6),
    "RoutingNumberRecognizer": Evidence(min_digits=6),
}
"""Per recognizer name, what any span it flags holds; a test checks every span of the evaluation corpus."""


def evidence_of(recognizer: EntityRecognizer) -> Evidence:
    """The declared evidence of ``recognizer``, or :data:`ALWAYS_RUN` for one not declared here."""
    return EVIDENCE.get(recognizer.name, ALWAYS_RUN)


def all_recognizers(phone_regions: Sequence[str] = ("US",), language: str = "en") -> list[EntityRecognizer]:
    """Every recognizer the guard can use: Presidio's PII ones and FinTune's extra ones, for ``language``."""
    return [
        UsSsnRecognizer(supported_language=language),
        ContextSsnRecognizer(supported_language=language),
        FinancialCreditCardRecognizer(supported_language=language),
        Mastercard2SeriesRecognizer(supported_language=language),
        DottedCardRecognizer(supported_language=language),
        LongCardRecognizer(supported_language=language),
        OfflineEmailRecognizer(supported_language=language),
        FinancialPhoneRecognizer(supported_language=language, supported_regions=tuple(phone_regions)),
        ExtraPhoneRecognizer(supported_language=language),
        CaseBlindIbanRecognizer(supported_language=language),
        UsBankRecognizer(supported_language=language),
        AccountNumberRecognizer(supported_language=language),
        RoutingNumberRecognizer(supported_language=language),
    ]


def supported_entities() -> list[str]:
    """Entity types some recognizer here can detect, sorted."""
    return sorted({entity for r in all_recognizers() for entity in r.supported_entities})


def build_recognizers(
    entities: Sequence[str], phone_regions: Sequence[str], language: str = "en"
) -> list[EntityRecognizer]:
    """The recognizers that detect at least one of ``entities``."""
    wanted = set(entities)
    return [r for r in all_recognizers(phone_regions, language) if wanted & set(r.supported_entities)]
