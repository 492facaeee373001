"""Confidence calibration: temperature scaling and the expected calibration error that judges it.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks", ICML): one scalar T divides
the label logits before the softmax; T is the value that minimises the negative log-likelihood of the
validation split. T > 1 softens an over-confident model, T < 1 sharpens a timid one; the argmax, so every
label, never changes. Both backends fit T after training, store it in the model card (``calibration``), and
apply it when they load, so the confidence the guardrails compare with ``low_confidence_threshold`` means what
it says. Light: numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy.optimize import minimize_scalar

from fintune import LABELS
from fintune.config import InferenceSettings
from fintune.data import Example
from fintune.errors import ArtifactError
from fintune.evaluation import classification_metrics, write_json
from fintune.monitoring.drift import save_drift_baseline

TEMPERATURE_RANGE = (0.05, 20.0)
"""The temperatures the fit may choose from. An untrained model whose scores carry no signal drives the fit to
the upper end (as near uniform as allowed); a trained one lands well inside."""


class TemperedClassifier(Protocol):
    """What calibration needs of a model: probabilities, and a temperature it applies to its logits."""

    temperature: float

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """An (n, 3) array of probabilities in LABELS order, already divided by ``temperature``."""
        ...


def temper(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities the same logits give at ``temperature`` (softmax(log p / T); log p is logits + c)."""
    scaled = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean -log p(true label)."""
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(truth)), truth], 1e-12, 1.0))))


def fit_temperature(probabilities: np.ndarray, truth: np.ndarray, current: float = 1.0) -> float:
    """The temperature, within :data:`TEMPERATURE_RANGE`, that minimises the negative log-likelihood of ``truth``
    (label codes), for ``probabilities`` computed at temperature ``current``."""
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(temper(probabilities, float(np.exp(log_t)) / current), truth),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def reliability_bins(probabilities: np.ndarray, correct: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Per equal-width confidence bin holding sentences: its bounds, count, mean confidence and accuracy."""
    confidence = probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        if members.any():
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                         "confidence": float(confidence[members].mean()), "accuracy": float(correct[members].mean())})
    return rows


def expected_calibration_error(probabilities: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the bin's share."""
    return calibration_error(reliability_bins(probabilities, correct, bins))


def calibration_error(rows: list[dict[str, float]]) -> float:
    """The expected calibration error of :func:`reliability_bins` rows."""
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in rows))


def calibrate(
    classifier: TemperedClassifier, examples: list[Example], bins: int, source: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit the classifier's temperature on ``examples`` and set it; returns the calibrated probabilities and
    the card's ``calibration`` record (before/after ECE and NLL). A classifier already calibrated is refitted
    from its current temperature, so calibrating twice changes nothing."""
    truth = np.array([LABELS.index(ex.label) for ex in examples])
    before = classifier.predict_proba([ex.text for ex in examples])
    fitted = fit_temperature(before, truth, current=classifier.temperature)
    after = temper(before, fitted / classifier.temperature)
    correct = after.argmax(axis=1) == truth  # the same labels before and after
    classifier.temperature = fitted
    record = {
        "method": "temperature scaling (Guo et al., 2017)",
        "temperature": classifier.temperature,
        "fitted_on": source,
        "sentences": len(examples),
        "ece_before": round(expected_calibration_error(before, correct, bins), 4),
        "ece_after": round(expected_calibration_error(after, correct, bins), 4),
        "nll_before": round(negative_log_likelihood(before, truth), 4),
        "nll_after": round(negative_log_likelihood(after, truth), 4),
    }
    return after, record


def validation_probabilities(
    classifier: TemperedClassifier, examples: list[Example], inference: InferenceSettings, source: str
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """A freshly trained model's probabilities on ``examples``, calibrated there first when
    ``inference.calibrate`` (then also the card's ``calibration`` record, else None)."""
    if inference.calibrate:
        return calibrate(classifier, examples, inference.calibration_bins, source)
    return classifier.predict_proba([ex.text for ex in examples]), None


def score_validation(
    classifier: TemperedClassifier, examples: list[Example], subset: str, inference: InferenceSettings, out: Path
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Validation accuracy and macro-F1 of a freshly trained model (either backend) and, when
    ``inference.calibrate``, its fitted temperature (set on the classifier); writes ``validation_report.json`` and
    the drift baseline from its validation predictions into ``out`` (the service compares live predictions with it)."""
    source = f"validation of {subset} ({len(examples)} sentences)"
    probabilities, calibration = validation_probabilities(classifier, examples, inference, source)
    predicted = [LABELS[int(i)] for i in probabilities.argmax(axis=1)]
    metrics = classification_metrics([ex.label for ex in examples], predicted)
    write_json(out / "validation_report.json", metrics)
    save_drift_baseline(out, predicted, LABELS, source=source)
    return {"sentences": len(examples), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}, calibration


def card_temperature(card: dict[str, Any]) -> float:
    """The temperature a model card records (1.0, no scaling, for models trained before calibration);
    ArtifactError for one no fit gives (not a finite number above 0), which made every probability NaN."""
    recorded = (card.get("calibration") or {}).get("temperature", 1.0)
    try:
        temperature = float(recorded)
    except (TypeError, ValueError):
        temperature = math.nan
    if isinstance(recorded, bool) or not math.isfinite(temperature) or temperature <= 0:
        raise ArtifactError(f"the model card's calibration.temperature is {recorded!r}, not a number above 0: "
                            "refit it with `fintune calibrate --model <folder>`")
    return temperature
