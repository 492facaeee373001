"""`GuardrailResult`: what the guard tells its caller for audit, with no raw PII and no offsets into the raw text."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GuardrailResult(BaseModel):
    """The outcome of guarding one text: the masked text the model saw, what kinds of PII it held, output checks.

    It deliberately carries neither the raw PII values nor their positions in the raw text, so it can be logged,
    returned over HTTP and written to audit files as is.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    redacted_text: str = Field(description="The input with every PII span replaced by its type, e.g. <US_SSN>.")
    pii_detected: bool = Field(description="True when at least one PII span was masked.")
    pii_types: list[str] = Field(description="Entity types that were masked, sorted and unique.")
    pii_count: int = Field(ge=0, description="Number of masked spans.")
    pii_counts: dict[str, int] = Field(
        default_factory=dict, description="Masked spans per entity type (sums to pii_count)."
    )
    low_confidence: bool | None = Field(
        None, description="Prediction confidence below the configured threshold (None until check_output)."
    )
    invalid_label: bool | None = Field(
        None, description="The model produced a label outside negative/neutral/positive (None until check_output)."
    )

    def to_json(self) -> str:
        """The result as one line of JSON."""
        return self.model_dump_json()
