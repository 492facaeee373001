"""Temperature scaling: it recovers a known temperature, never changes a label, and a second fit is a no-op."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fintune import LABELS
from fintune.data import Example
from fintune.model.calibration import (
    calibrate,
    card_temperature,
    expected_calibration_error,
    fit_temperature,
    temper,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def sampled(true_temperature: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits / true_temperature): a model over-confident by that factor."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, len(LABELS)))
    truth = np.array([rng.choice(len(LABELS), p=p) for p in softmax(logits / true_temperature)])
    return logits, truth


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.0])
def test_fit_recovers_the_temperature_the_labels_were_drawn_at(true_temperature: float) -> None:
    logits, truth = sampled(true_temperature)
    assert fit_temperature(softmax(logits), truth) == pytest.approx(true_temperature, rel=0.08)


def test_tempering_keeps_every_label_and_lowers_the_calibration_error() -> None:
    logits, truth = sampled(2.0)
    raw = softmax(logits)
    calibrated = temper(raw, fit_temperature(raw, truth))
    np.testing.assert_array_equal(calibrated.argmax(axis=1), raw.argmax(axis=1))
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)
    np.testing.assert_allclose(temper(raw, 1.0), raw, atol=1e-9)
    correct = raw.argmax(axis=1) == truth
    assert expected_calibration_error(calibrated, correct, 10) < 0.5 * expected_calibration_error(raw, correct, 10)


class LogitClassifier:
    """A classifier whose logits are fixed per text: the calibrate() contract without a model."""

    def __init__(self, logits: dict[str, np.ndarray]) -> None:
        self.logits = logits
        self.temperature = 1.0

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(np.stack([self.logits[t] for t in texts]) / self.temperature)


def test_calibrate_sets_the_temperature_and_a_second_fit_changes_nothing() -> None:
    logits, truth = sampled(2.0, n=3000, seed=1)
    examples = [Example(id=i, text=str(i), label=LABELS[k]) for i, k in enumerate(truth)]
    classifier = LogitClassifier({str(i): row for i, row in enumerate(logits)})
    _, record = calibrate(classifier, examples, bins=10, source="synthetic")
    assert classifier.temperature == record["temperature"] == pytest.approx(2.0, rel=0.1)
    assert record["ece_after"] < record["ece_before"] and record["nll_after"] < record["nll_before"]
    _, again = calibrate(classifier, examples, bins=10, source="synthetic")
    assert again["temperature"] == pytest.approx(record["temperature"], rel=1e-3)
    assert card_temperature({"calibration": again}) == again["temperature"]
    assert card_temperature({}) == 1.0  # models trained before calibration are read unchanged
