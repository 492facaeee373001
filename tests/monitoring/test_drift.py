"""Drift detection: divergences against scipy, the baseline file, the minimum window, and hysteresis (seeded)."""

from __future__ import annotations

import json
import math
import random

import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from fintune.config import MonitoringSettings
from fintune.errors import ArtifactError
from fintune.monitoring import (
    BASELINE_FILENAME,
    DriftBaseline,
    DriftDetector,
    DriftState,
    load_drift_baseline,
    save_drift_baseline,
)
from fintune.monitoring.drift import js_distance, kl_divergence, psi, smoothed

LABELS = ("negative", "neutral", "positive")
# Roughly Financial PhraseBank's label shares: 12 % negative, 60 % neutral, 28 % positive.
BASELINE = DriftBaseline(LABELS, (120, 600, 280))


def draw(rng: random.Random, weights: tuple[float, ...], n: int) -> list[str]:
    return rng.choices(LABELS, weights=weights, k=n)


def test_divergences_match_scipy() -> None:
    p, q = [0.2, 0.5, 0.3], [0.1, 0.6, 0.3]
    assert kl_divergence(p, q) == pytest.approx(entropy(p, q))
    assert psi(p, q) == pytest.approx(entropy(p, q) + entropy(q, p))
    assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2))
    assert kl_divergence(q, q) == 0 and js_distance(q, q) == pytest.approx(0, abs=1e-12)
    assert js_distance([1, 0, 0], [0, 0, 1]) == pytest.approx(1.0)


def test_smoothing_keeps_an_empty_class_finite() -> None:
    p = smoothed([50, 0, 0], alpha=0.5)
    q = smoothed([0, 30, 20], alpha=0.5)
    assert sum(p) == pytest.approx(1.0) and min(p) > 0
    assert math.isfinite(kl_divergence(p, q)) and math.isfinite(psi(p, q))


def test_baseline_file_round_trip(tmp_path) -> None:
    path = save_drift_baseline(tmp_path / "model", ["neutral"] * 6 + ["positive"] * 3 + ["negative"], LABELS)
    assert path.name == BASELINE_FILENAME
    data = json.loads(path.read_text())
    assert data["counts"] == {"negative": 1, "neutral": 6, "positive": 3} and data["total"] == 10
    loaded = load_drift_baseline(tmp_path / "model")
    assert loaded.labels == LABELS and loaded.counts == (1, 6, 3) and loaded.source == "validation"
    assert loaded.probabilities()["neutral"] == pytest.approx(0.6)


def test_baseline_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="train the model"):
        load_drift_baseline(tmp_path)
    (tmp_path / BASELINE_FILENAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="retrain"):
        load_drift_baseline(tmp_path)
    with pytest.raises(ArtifactError, match="not in"):
        save_drift_baseline(tmp_path, ["bullish"], LABELS)


@pytest.mark.parametrize(
    ("labels", "counts", "message"),
    [
        (list(LABELS), {"negative": -1, "neutral": 5, "positive": 5}, "not negative"),  # was a math domain error
        (list(LABELS), {"negative": 0, "neutral": 0, "positive": 0}, "not all zero"),  # was a ZeroDivisionError
        (list(LABELS), {"negative": 1e400, "neutral": 5, "positive": 5}, "whole number"),  # JSON's inf
        (list(LABELS), {"negative": 1.5, "neutral": 5, "positive": 5}, "whole number"),
        (["neutral", "neutral"], {"neutral": 3}, "distinct"),
        ([], {}, "at least one"),
        ("negative", {}, "must be a list"),
        (["bearish", "bullish"], {"bearish": 5, "bullish": 5}, "the model predicts"),  # drift never judged
        (["negative", "positive"], {"negative": 5, "positive": 5}, "the model predicts"),
    ],
)
def test_a_baseline_that_could_not_be_judged_against_is_refused(tmp_path, labels, counts, message) -> None:
    (tmp_path / BASELINE_FILENAME).write_text(json.dumps({"labels": labels, "counts": counts}))
    with pytest.raises(ArtifactError, match=message) as caught:
        load_drift_baseline(tmp_path)
    assert "retrain" in str(caught.value) and str(tmp_path) in str(caught.value)


def test_a_baseline_written_with_float_counts_still_loads(tmp_path) -> None:
    counts = {"negative": 1.0, "neutral": 6.0, "positive": 3.0}
    (tmp_path / BASELINE_FILENAME).write_text(json.dumps({"labels": list(LABELS), "counts": counts}))
    assert load_drift_baseline(tmp_path).counts == (1, 6, 3)


def test_an_impossible_baseline_cannot_be_built_in_code_either() -> None:
    with pytest.raises(ArtifactError, match="3 counts for 2 labels"):
        DriftBaseline(("negative", "positive"), (1, 2, 3))


def test_no_verdict_before_the_minimum_window() -> None:
    detector = DriftDetector(BASELINE, MonitoringSettings())
    fired = [detector.update("negative") for _ in range(99)]
    assert not any(fired)
    assert detector.state is DriftState.WARMING_UP and detector.kl is None
    assert detector.update("negative") is not None  # the 100th prediction gives the verdict: drifted


def test_skewed_stream_fires_once_per_episode() -> None:
    rng = random.Random(5)
    settings = MonitoringSettings()  # window 500, min 100, threshold 0.15, recovery 0.075
    detector = DriftDetector(BASELINE, settings)
    fired = []

    def feed(labels: list[str]) -> None:
        for label in labels:
            report = detector.update(label)
            if report is not None:
                fired.append(report)

    feed(draw(rng, (0.12, 0.60, 0.28), 600))
    assert fired == [] and detector.state is DriftState.STABLE
    feed(draw(rng, (0.45, 0.35, 0.20), 2000))  # a market shock: far more negative predictions
    assert len(fired) == 1 and detector.state is DriftState.DRIFTED
    first = fired[0]
    assert first.kl is not None and first.kl > 0.15 and first.episodes == 1
    assert first.psi is not None and first.psi > first.kl and 0 < (first.js_distance or 0) < 1
    feed(draw(rng, (0.12, 0.60, 0.28), 2000))  # back to normal: the episode ends (KL < 0.075)
    assert len(fired) == 1 and detector.state is DriftState.STABLE
    feed(draw(rng, (0.45, 0.35, 0.20), 2000))  # a second episode fires again
    assert len(fired) == 2 and fired[1].episodes == 2


def test_hysteresis_holds_between_the_two_thresholds() -> None:
    """A KL that stays between 0.075 and 0.15 after an episode neither ends it nor fires again."""
    rng = random.Random(11)
    detector = DriftDetector(BASELINE, MonitoringSettings())
    starts = [detector.update(x) for x in draw(rng, (0.45, 0.35, 0.20), 1000)]
    assert sum(r is not None for r in starts) == 1
    # A repeated block of 50 with exact shares 30 / 48 / 22 %: KL(window || baseline) stays near 0.11.
    block = ["negative"] * 15 + ["neutral"] * 24 + ["positive"] * 11
    rng.shuffle(block)
    kls, starts = [], []
    for label in block * 60:
        starts.append(detector.update(label))
        kls.append(detector.kl)
    assert min(kls[500:]) > 0.075 and max(kls[500:]) < 0.15
    assert not any(starts) and detector.state is DriftState.DRIFTED
    # The same stream judged on full windows only, without a prior episode, never starts one.
    fresh = DriftDetector(BASELINE, MonitoringSettings(drift_min_samples=500))
    assert not any(fresh.update(label) for label in block * 60) and fresh.state is DriftState.STABLE


def test_baseline_stream_never_fires_in_1000_windows() -> None:
    """1,000 disjoint windows of 100 predictions drawn from the baseline itself (and every overlapping one)."""
    rng = random.Random(2024)
    settings = MonitoringSettings(drift_window=100, drift_min_samples=100)
    detector = DriftDetector(BASELINE, settings)
    fired, worst = 0, 0.0
    for label in draw(rng, (0.12, 0.60, 0.28), 100 * 1000):
        fired += detector.update(label) is not None
        worst = max(worst, detector.kl or 0.0)
    assert fired == 0
    assert worst < settings.drift_threshold


def test_a_label_outside_the_baseline_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    detector = DriftDetector(BASELINE, MonitoringSettings())
    for _ in range(3):
        assert detector.update("bullish") is None
    assert detector.report().window_size == 0
    assert sum("bullish" in r.getMessage() for r in caplog.records) == 1  # warned once, not per request


def test_settings_refuse_a_window_smaller_than_the_minimum() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="drift_min_samples"):
        MonitoringSettings(drift_window=50)
    with pytest.raises(ValidationError, match="hysteresis"):
        MonitoringSettings(drift_recovery_threshold=0.2)
