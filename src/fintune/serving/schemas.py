"""Request and response bodies of the HTTP API (pydantic), as published in the OpenAPI schema at /docs.

Types are checked here (a number where a string belongs is a 422), except for the entries of a batch: those,
like the content rules that depend on settings (empty or whitespace text, length, control characters, batch
size), are checked by the pipeline, so a bad entry gets its own ``error`` object instead of failing the request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from fintune.config import ServingSettings
from fintune.guardrails import GuardrailResult

Label = Literal["negative", "neutral", "positive"]


BatchText = Annotated[Any, WithJsonSchema({"type": "string"})]
"""A batch entry: published as a string, parsed as any JSON value, so that an entry of another type is that
entry's own error (``invalid_input``) and does not fail the other entries."""


class _Body(BaseModel):
    """Request bodies: unknown fields are an error, so a misspelt key is a clear 422."""

    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Body):
    """One text to classify."""

    text: str = Field(description="The text (a sentence or short paragraph); PII is masked before the model.",
                      examples=["Operating profit rose to EUR 13.1 mn from EUR 8.7 mn."])


class BatchRequest(_Body):
    """Several texts, classified in one request (at most serving.max_batch_items)."""

    texts: list[BatchText] = Field(description="The texts, answered in the same order.",
                                   examples=[["Net sales fell 5 %.", "The board meets on Monday."]])


class AnalyzeRequest(_Body):
    """A long document: an earnings-call transcript or a filing section."""

    text: str = Field(
        description="The document; it is split into sentences, each classified.",
        examples=["Net sales rose 12 % to EUR 84.2 mn. Operating loss widened to EUR 3.1 mn. "
                  "The company will publish its next report in April."],
    )


class ModelInfo(BaseModel):
    """Which model answered."""

    name: str = Field(description="Model name (the base model id, or tfidf-<baseline> when degraded).")
    profile: str = Field(description="Settings profile the model was loaded from.")
    version: str = Field(
        description="'trained-<date>-<hash of the model card>', 'base-untuned', 'untrained-head', or the "
        "baseline's source."
    )


_REQUEST_ID = "The request's id (also in the X-Request-ID header)."
_LATENCY = "Time the service spent on the request."


class ErrorInfo(BaseModel):
    """What went wrong, for a whole request or one batch item."""

    code: str = Field(description="Stable machine-readable code, e.g. invalid_input, unauthorized, overloaded.")
    message: str = Field(description="What happened and what to do about it.")
    retry_after_s: float | None = Field(None, description="When retrying makes sense, after how many seconds.")


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorInfo = Field(description="The error: a stable code, what to do, when to retry.")
    request_id: str = Field(description=_REQUEST_ID)


class Classification(BaseModel):
    """One text's answer."""

    label: Label = Field(description="The predicted sentiment.")
    scores: dict[str, float] = Field(description="Probability of each label.")
    confidence: float = Field(ge=0, le=1, description="Probability of the predicted label.")
    guardrail: GuardrailResult = Field(description="PII masking and output checks (no raw PII, no offsets).")
    degraded: bool = Field(description="True when the TF-IDF baseline answered instead of the model.")
    model: ModelInfo = Field(description="The model that answered: name, profile and version.")


class ClassifyResponse(Classification):
    """POST /v1/classify."""

    latency_ms: float = Field(description="Time the service spent on the request.")
    request_id: str = Field(description=_REQUEST_ID)


class BatchItem(BaseModel):
    """One batch entry: a classification, or an error that concerns this entry only."""

    index: int = Field(description="Position of the text in the request.")
    result: Classification | None = Field(None, description="The answer, absent when error is set.")
    error: ErrorInfo | None = Field(None, description="Why this entry has no answer.")


class BatchResponse(BaseModel):
    """POST /v1/classify/batch: one entry per input, in input order."""

    results: list[BatchItem] = Field(description="One entry per text, in input order.")
    errors: int = Field(description="Entries that carry an error.")
    degraded: int = Field(description="Entries answered by the TF-IDF baseline.")
    latency_ms: float = Field(description=_LATENCY)
    request_id: str = Field(description=_REQUEST_ID)


class SentenceResult(BaseModel):
    """One sentence of an analysed document (its text redacted)."""

    index: int = Field(description="Position of the sentence (or piece) among the document's classified texts.")
    text: str = Field(description="The sentence with PII masked.")
    label: Label = Field(description="The predicted sentiment.")
    confidence: float = Field(ge=0, le=1, description="Probability of the predicted label.")
    scores: dict[str, float] = Field(description="Probability of each label.")
    degraded: bool = Field(description="True when the TF-IDF baseline answered instead of the model.")
    pii_types: list[str] = Field(description="PII types masked in this sentence, e.g. EMAIL_ADDRESS.")
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
    most_negative: SentenceResult | None = Field(
        description="Of the sentences labelled negative, the one with the highest P(negative); null when none is.")
    most_positive: SentenceResult | None = Field(
        description="Of the sentences labelled positive, the one with the highest P(positive); null when none is.")
    degraded_sentences: int = Field(description="Sentences answered by the TF-IDF baseline.")


class SentenceFailure(BaseModel):
    """A sentence of an analysed document that could not be classified (left out of the aggregate)."""

    index: int = Field(description="Position of the sentence among the document's texts.")
    error: ErrorInfo = Field(description="Why it could not be classified.")


class AnalyzeResponse(BaseModel):
    """POST /v1/analyze (when no sentence could be classified, the request fails with the first reason)."""

    aggregate: Aggregate = Field(description="The document as a whole, over the sentences classified.")
    results: list[SentenceResult] = Field(description="Each classified sentence (or piece), in document order.")
    failed: list[SentenceFailure] = Field(description="Sentences that could not be classified, and why.")
    latency_ms: float = Field(description=_LATENCY)
    request_id: str = Field(description=_REQUEST_ID)


class HealthResponse(BaseModel):
    """GET /healthz and /readyz."""

    status: str = Field(description="'ok' (alive), 'ready' or 'not_ready'.")
    model: str = Field(description="Model state: loading, ready, failed, or reloading (after out of memory).")
    breaker: str = Field(description="Circuit breaker state: closed, open or half_open.")
    degraded_available: bool = Field(description="Whether the TF-IDF baseline can answer when the model cannot.")
    request_id: str = Field(description=_REQUEST_ID)


class MetricsSnapshot(BaseModel):
    """GET /metrics/json: the monitor's snapshot (layout in the README, 'Exports') plus the serving state."""

    model_config = ConfigDict(extra="allow")  # a key the monitor adds later is served, not dropped

    requests: dict[str, Any] = Field(description="total, window (requests in the latency window), uptime_s.")
    latency_s: dict[str, Any] = Field(description="p50, p95, p99 of request latency, in seconds.")
    throughput_rps: float = Field(description="Requests per second over the recent window.")
    errors: dict[str, Any] = Field(description="rate, total, by_type.")
    predictions: dict[str, Any] = Field(description="counts and distribution per label.")
    drift: dict[str, Any] = Field(description="state, kl, psi, js_distance, thresholds, distributions, episodes.")
    health: dict[str, Any] = Field(description="score (0-100), components, weights, penalty.")
    breaker_state: str | None = Field(description="closed, open or half_open (None before the first call).")
    pii_detections: dict[str, int] = Field(description="PII entities masked, by type.")
    fallbacks: dict[str, int] = Field(description="Requests answered by a fallback path, by reason.")
    serving: dict[str, Any] = Field(
        description="Model and breaker state, degraded mode, per-stage timings, queue depth, batching statistics "
        "(empty while the service starts)."
    )
    request_id: str = Field(description=_REQUEST_ID)


def _error_response(description: str, **headers: str) -> dict[str, Any]:
    """An OpenAPI response entry: an ErrorResponse body, what its codes mean, and the headers it carries."""
    entry: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        entry["headers"] = {name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()}
    return entry


_RETRY_AFTER = "Seconds after which a retry can succeed (whole seconds, at least 1), when one can."


def _error_responses(invalid_input: str, server_errors: str, bad_output: str | None) -> dict[int | str, dict[str, Any]]:
    """The error responses of one endpoint: the shared ones and its own 422 / 500 / 502 meanings."""
    responses: dict[int | str, dict[str, Any]] = {
        400: _error_response("`invalid_json`: the body is not valid JSON; `invalid_body`: it is not UTF-8, is "
                             "nested too deeply or holds a number of more than 4,300 digits."),
        401: _error_response("`unauthorized`: the API key is missing or wrong (only when serving.api_key is set).",
                             **{"WWW-Authenticate": "Bearer"}),
        413: _error_response("`body_too_large`: the body is over serving.max_body_bytes."),
        415: _error_response("`unsupported_media_type`: send the body with Content-Type: application/json."),
        422: _error_response(f"`invalid_request`: a wrong type, a missing or unknown field; `invalid_input`: "
                             f"{invalid_input}."),
        500: _error_response(f"{server_errors}`internal_error`: anything else (the request id finds it in the logs)."),
        503: _error_response("`overloaded`: the queue is full; `model_unavailable`: the circuit breaker is open, the "
                             "model failed or is loading, and no TF-IDF baseline stands in "
                             "(serving.degraded_mode `fail`, or none trained).",
                             **{"Retry-After": _RETRY_AFTER}),
    }
    if bad_output is not None:
        responses[502] = _error_response(bad_output)
    return responses


_BAD_OUTPUT = ("`invalid_label`: the model answered a label outside negative/neutral/positive; `invalid_output`: "
               "a score that is not a probability (NaN, infinite, outside 0..1)")
_CONTENT = "control characters other than tab and newlines, or a lone surrogate"

CLASSIFY_ERRORS = _error_responses(
    f"empty text (whitespace and invisible characters only), a text over serving.max_text_chars, {_CONTENT}",
    "`guardrail_failed`: the PII guard failed, so nothing reached the model; ", _BAD_OUTPUT + ".",
)
BATCH_ERRORS = _error_responses(
    "an empty batch or one over serving.max_batch_items (a bad text or one that is not a string, a failed guard "
    "or model output gets its own `error` inside a 200 instead)",
    "", None,
)
ANALYZE_ERRORS = _error_responses(
    f"an empty document, one over serving.max_document_chars or serving.max_document_sentences, {_CONTENT}",
    "`guardrail_failed`: the PII guard failed, so nothing reached the model; ",
    _BAD_OUTPUT + ", for every sentence (when only some fail, they are listed in `failed` inside a 200).",
)


def publish_limits(openapi: dict[str, Any], serving: ServingSettings) -> dict[str, Any]:
    """``openapi`` with the request limits the service enforces written into its request schemas (the pipeline
    checks them, so its own messages and per-item batch errors stay; the schema tells clients in advance)."""
    schemas = openapi.get("components", {}).get("schemas", {})
    limits = {("ClassifyRequest", "text"): {"minLength": 1, "maxLength": serving.max_text_chars},
              ("AnalyzeRequest", "text"): {"minLength": 1, "maxLength": serving.max_document_chars},
              ("BatchRequest", "texts"): {"minItems": 1, "maxItems": serving.max_batch_items}}
    for (model, field_name), limit in limits.items():
        if model in schemas:
            schemas[model]["properties"][field_name].update(limit)
    return openapi
