"""FinTune's exception types: every error a user can meet, each with a message that says what to do.

Every module raises a subclass of :class:`FinTuneError`; the CLI turns one into a single readable line and a
non-zero exit code, and the service turns one into a 4xx/5xx body. Nothing here knows about HTTP.
"""

from __future__ import annotations


class FinTuneError(Exception):
    """Base class of every error FinTune raises on purpose; its message is meant for the user."""

    exit_code: int = 2


class ConfigError(FinTuneError):
    """A profile is unknown, unreadable or holds an invalid value."""


class DataError(FinTuneError):
    """Base class of data-loading problems."""


class DataNotFoundError(DataError):
    """Financial PhraseBank could be found neither locally nor on the hub."""


class DataFormatError(DataError):
    """A data file holds a line that is not `sentence@label` with a known label."""


class UnknownSubsetError(DataError):
    """A subset name is not one of 50agree, 66agree, 75agree, allagree."""


class ArtifactError(FinTuneError):
    """A saved artifact (pipeline, adapter, baseline) is missing or does not match the data it is used with."""


class CircuitOpenError(FinTuneError):
    """The circuit breaker is OPEN (or its HALF_OPEN trials are taken): the call was rejected unrun."""

    def __init__(self, name: str, state: str, retry_after_s: float) -> None:
        self.breaker_name = name
        self.state = state
        self.retry_after_s = retry_after_s
        super().__init__(
            f"circuit breaker {name!r} is {state}: the model failed repeatedly and is not being called; "
            f"retry in {retry_after_s:.1f} s"
        )


class RecoveryError(FinTuneError):
    """Automatic recovery gave up (the model could not be reloaded within the allowed attempts)."""


class ModelError(FinTuneError):
    """A base model cannot be found, converted or loaded, or its tokenizer cannot score the three labels."""


class ScaleError(FinTuneError):
    """Ray is not installed, its cluster cannot be reached, or its actors died more often than allowed."""


class InvalidInputError(FinTuneError):
    """A text sent for classification is empty, too long, or holds control characters or invalid Unicode."""


class ServiceOverloadedError(FinTuneError):
    """The service's bounded queue is full: the request was refused unrun; retry after ``retry_after_s``."""

    def __init__(self, queued: int, capacity: int, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the service is overloaded ({queued} of {capacity} queue slots taken): retry in "
            f"{retry_after_s:.0f} s, send smaller batches, or raise serving.queue_size"
        )


class ModelUnavailableError(FinTuneError):
    """The model is not ready, failed or is behind an open breaker, and the degraded mode is off or absent."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the model is unavailable ({reason}) and serving.degraded_mode does not allow the TF-IDF baseline "
            f"answer; retry in {retry_after_s:.0f} s"
        )


class ServingError(FinTuneError):
    """The HTTP service cannot start: its host and port are taken or cannot be bound."""


class IncompleteRunError(FinTuneError):
    """An offline run wrote every record, but the system (not the input) left some texts without an answer."""

    exit_code: int = 1


class GuardrailError(FinTuneError):
    """The PII guardrails cannot run (spaCy model not installed, unknown entity type) or have nothing to read."""
