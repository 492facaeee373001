"""Documents for /v1/analyze: sentence splitting (spaCy's rule-based sentencizer) and the document aggregate.

The splitter is a blank English spaCy pipeline with the ``sentencizer`` component: no model download, and its
tokenizer keeps numbers such as ``EUR 13.1 mn``, e-mail addresses and URLs whole, so a split never cuts a PII
value in two before the guard sees it. Line breaks between paragraphs also end a sentence. A sentence over the
per-text limit is classified in pieces, cut outside every PII span the guard finds in it (:func:`split_long`):
nothing of it goes unclassified. The service masks the whole document before splitting it (a split can part a
number from the word that marks it as PII, "account no." from "0012345678"); :func:`masks_in_pieces` tells
each sentence which masks it holds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import regex

from fintune.errors import InvalidInputError

SENTIMENT_SIGN = {"negative": -1.0, "neutral": 0.0, "positive": 1.0}
NEUTRAL_BAND = 0.1
_PARAGRAPH = re.compile(r"\n\s*\n|\r\n\s*\r\n")


@functools.lru_cache(maxsize=1)
def _sentencizer() -> Any:
    """The blank English pipeline with a sentencizer (built once per process)."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.max_length = 2_000_000
    return nlp


_BLANK = regex.compile(r"[\p{Default_Ignorable_Code_Point}\s]*")


def is_blank(text: str) -> bool:
    """Whether ``text`` has nothing to classify: only whitespace and characters Unicode says to show as nothing
    (zero-width spaces and joiners, byte-order marks, variation selectors, Hangul fillers; ``str.strip`` keeps
    them)."""
    return _BLANK.fullmatch(text) is not None


def split_sentences(document: str) -> list[str]:
    """The document's sentences, stripped, blank ones dropped, in order."""
    nlp = _sentencizer()
    sentences: list[str] = []
    for paragraph in _PARAGRAPH.split(document):
        if not is_blank(paragraph):
            sentences += [s.text.strip() for s in nlp(paragraph).sents if not is_blank(s.text)]
    return sentences


def check_document(
    document: str, max_chars: int, max_sentences: int, sentences: Sequence[str], pieces: int = 0
) -> None:
    """InvalidInputError when the document is empty, too long or has too many sentences; ``pieces`` of the
    ``sentences`` are pieces of over-long ones, each a text to classify (and a queue slot) of its own."""
    if is_blank(document):
        raise InvalidInputError("text is empty or only whitespace or invisible characters: send the document's text")
    if len(document) > max_chars:
        raise InvalidInputError(
            f"document has {len(document)} characters, more than the limit of {max_chars} "
            "(serving.max_document_chars): send it in sections"
        )
    if len(sentences) > max_sentences:
        counted = (f"{len(sentences)} texts to classify ({pieces} of them pieces of sentences over "
                   "serving.max_text_chars, which count once per piece)" if pieces else f"{len(sentences)} sentences")
        raise InvalidInputError(
            f"document has {counted}, more than the limit of {max_sentences} "
            "(serving.max_document_sentences): send it in sections"
        )


def cut_sentence(sentence: str, max_chars: int, spans: Sequence[Any]) -> str:
    """The first piece of ``sentence`` (at most ``max_chars``, a run-on 'sentence' of a filing table can be very
    long): up to the last whitespace before the limit, never inside a PII span (``start``/``end`` found in the
    whole sentence), so a value cut in two cannot slip past the guard."""
    if len(sentence) <= max_chars:
        return sentence
    cut = max_chars
    while any(span.start < cut < span.end for span in spans):
        cut = min(span.start for span in spans if span.start < cut < span.end)
    if cut == 0:  # one value longer than the limit: kept whole (the per-text check then refuses it)
        return sentence[: max(span.end for span in spans if span.start == 0)]
    space = max((i for i in range(cut + 1) if i < len(sentence) and sentence[i].isspace()), default=0)
    return sentence[: space or cut].rstrip()


def split_long(sentence: str, max_chars: int, spans: Sequence[Any]) -> list[str]:
    """``sentence`` as consecutive pieces of at most ``max_chars`` (:func:`cut_sentence` each), all of it."""
    pieces: list[str] = []
    start = 0
    while start < len(sentence):
        rest = sentence[start:]
        shifted = [_Span(span.start - start, span.end - start) for span in spans if span.end > start]
        piece = cut_sentence(rest, max_chars, shifted)
        pieces.append(piece)
        start += len(piece)
        while start < len(sentence) and sentence[start].isspace():
            start += 1
    return pieces


class _Span(NamedTuple):
    """A span's offsets within the rest of a sentence."""

    start: int
    end: int


class Mask(NamedTuple):
    """Where the guard's ``<TYPE>`` mask of one PII span sits in the masked document, and the span's type."""

    start: int
    end: int
    entity_type: str


def masks_after_masking(spans: Sequence[Any]) -> list[Mask]:
    """Where each of the (non-overlapping) ``spans`` ends up once the guard has replaced it by ``<TYPE>``."""
    masks: list[Mask] = []
    shift = 0  # how much longer the masked text is than the original up to here
    for span in sorted(spans, key=lambda span: span.start):
        token = f"<{span.entity_type}>"
        masks.append(Mask(span.start + shift, span.start + shift + len(token), span.entity_type))
        shift += len(token) - (span.end - span.start)
    return masks


def masks_in_pieces(masked: str, pieces: Sequence[str], masks: Sequence[Mask]) -> list[list[str]]:
    """For each piece (consecutive substrings of ``masked``, in order, as the splitters cut them), the types of
    the masks inside it."""
    found: list[list[str]] = []
    cursor = 0
    for piece in pieces:
        start = masked.find(piece, cursor)
        if start < 0:  # cannot happen for the splitters' pieces; no mask is then attributed to it
            found.append([])
            continue
        cursor = start + len(piece)
        found.append([mask.entity_type for mask in masks if start <= mask.start and mask.end <= cursor])
    return found


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Label shares, confidence-weighted score, document label and the extreme sentences of classified results.

    Each result needs ``label``, ``confidence``, ``scores`` and ``degraded``; the extremes are returned as given.
    """
    n = len(results)
    shares = {label: sum(r["label"] == label for r in results) / n if n else 0.0 for label in SENTIMENT_SIGN}
    weight = sum(r["confidence"] for r in results)
    score = sum(r["confidence"] * SENTIMENT_SIGN[r["label"]] for r in results) / weight if weight else 0.0
    label = "negative" if score < -NEUTRAL_BAND else "positive" if score > NEUTRAL_BAND else "neutral"
    return {
        "sentences": n,
        "label_shares": shares,
        "score": round(score, 6),
        "label": label,
        "most_negative": most(results, "negative"),
        "most_positive": most(results, "positive"),
        "degraded_sentences": sum(bool(r["degraded"]) for r in results),
    }


def most(results: Sequence[dict[str, Any]], label: str) -> dict[str, Any] | None:
    """Of the results labelled ``label``, the one with the highest probability of it (the first on a tie); None
    when no result has that label: a document of bad news has no "most positive" sentence to show."""
    labelled = [r for r in results if r["label"] == label]
    return max(labelled, key=lambda r: r["scores"].get(label, 0.0)) if labelled else None
