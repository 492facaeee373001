"""Request and response bodies of the HTTP API (pydantic), as published in the OpenAPI schema at /docs.

Types are checked here (a number where a string belongs is a 422); the content rules that depend on settings
(empty or whitespace text, length, control characters, batch size) are checked by the pipeline, so a bad item
in a batch gets its own ``error`` object instead of failing the request.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fintune.guardrails import GuardrailResult

Label = Literal["negative", "neutral", "positive"]


class _Body(BaseModel):
    """Request bodies: unknown fields are an error, so a misspelt key is a clear 422."""

    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Body):
    """One text to classify."""

    text: str = Field(description="The text (a sentence or short paragraph); PII is masked before the model.",
                      examples=["Operating profit rose to EUR 13.1 mn from EUR 8.7 mn."])


class BatchRequest(_Body):
    """Several texts, classified in one request (at most serving.max_batch_items)."""

    texts: list[str] = Field(description="The texts, answered in the same order.",
                             examples=[["Net sales fell 5 %.", "The board meets on Monday."]])


class AnalyzeRequest(_Body):
    """A long document: an earnings-call transcript or a filing section."""

    text: str = Field(description="The document; it is split into sentences, each classified.")


class ModelInfo(BaseModel):
    """Which model answered."""

    name: str = Field(description="Model name (the base model id, or tfidf-<baseline> when degraded).")
    profile: str = Field(description="Settings profile the model was loaded from.")
    version: str = Field(
        description="'trained-<date>-<hash of the model card>', 'base-untuned', 'untrained-head', or the "
        "baseline's source."
    )


class ErrorInfo(BaseModel):
    """What went wrong, for a whole request or one batch item."""

    code: str = Field(description="Stable machine-readable code, e.g. invalid_input, unauthorized, overloaded.")
    message: str = Field(description="What happened and what to do about it.")
    retry_after_s: float | None = Field(None, description="When retrying makes sense, after how many seconds.")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorInfo
    request_id: str = Field(description="The request's id (also in the X-Request-ID header).")


class Classification(BaseModel):
    """One text's answer."""

    label: Label = Field(description="The predicted sentiment.")
    scores: dict[str, float] = Field(description="Probability of each label.")
    confidence: float = Field(ge=0, le=1, description="Probability of the predicted label.")
    guardrail: GuardrailResult = Field(description="PII masking and output checks (no raw PII, no offsets).")
    degraded: bool = Field(description="True when the TF-IDF baseline answered instead of the model.")
    model: ModelInfo


class ClassifyResponse(Classification):
    """POST /v1/classify."""

    latency_ms: float = Field(description="Time the service spent on the request.")
    request_id: str


class BatchItem(BaseModel):
    """One batch entry: a classification, or an error that concerns this entry only."""

    index: int = Field(description="Position of the text in the request.")
    result: Classification | None = Field(None, description="The answer, absent when error is set.")
    error: ErrorInfo | None = Field(None, description="Why this entry has no answer.")


class BatchResponse(BaseModel):
    """POST /v1/classify/batch: one entry per input, in input order."""

    results: list[BatchItem]
    errors: int = Field(description="Entries that carry an error.")
    degraded: int = Field(description="Entries answered by the TF-IDF baseline.")
    latency_ms: float
    request_id: str


class SentenceResult(BaseModel):
    """One sentence of an analysed document (its text redacted)."""

    index: int
    text: str = Field(description="The sentence with PII masked.")
    label: Label
    confidence: float
    scores: dict[str, float]
    degraded: bool
    pii_types: list[str]
    cut: bool = Field(
        False, description="True for each piece of a sentence over the per-text limit, classified piece by piece "
        "(cut at whitespace, never inside a PII value)."
    )


class Aggregate(BaseModel):
    """The document as a whole."""

    sentences: int = Field(description="Sentences classified.")
    label_shares: dict[str, float] = Field(description="Share of sentences per label.")
    score: float = Field(
        description="Confidence-weighted sentiment in [-1, 1]: sum(c_i * s_i) / sum(c_i), s = +1 positive, "
        "0 neutral, -1 negative, c = confidence."
    )
    label: Label = Field(description="negative below -0.1, positive above 0.1, else neutral.")
    most_negative: SentenceResult | None = Field(description="The sentence with the highest P(negative).")
    most_positive: SentenceResult | None = Field(description="The sentence with the highest P(positive).")
    degraded_sentences: int


class SentenceFailure(BaseModel):
    """A sentence of an analysed document that could not be classified (left out of the aggregate)."""

    index: int
    error: ErrorInfo


class AnalyzeResponse(BaseModel):
    """POST /v1/analyze (when no sentence could be classified, the request fails with the first reason)."""

    aggregate: Aggregate
    results: list[SentenceResult]
    failed: list[SentenceFailure] = Field(description="Sentences that could not be classified, and why.")
    latency_ms: float
    request_id: str


class HealthResponse(BaseModel):
    """GET /healthz and /readyz."""

    status: str = Field(description="'ok' (alive), 'ready' or 'not_ready'.")
    model: str = Field(description="Model state: loading, ready or failed.")
    breaker: str = Field(description="Circuit breaker state: closed, open or half_open.")
    degraded_available: bool = Field(description="Whether the TF-IDF baseline can answer when the model cannot.")
    request_id: str
