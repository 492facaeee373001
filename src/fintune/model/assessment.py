"""Judging a trained model on a test split, and against the TF-IDF baselines on the very same sentences.

``metrics.json``: accuracy, macro-F1, per-class report, confusion matrix (JSON + PNG), expected calibration
error with its reliability bins (JSON + ``model_reliability.png``), latency p50/p95 per sentence, batch
throughput and memory (the loaded model's footprint as it serves, and the process's peak resident memory), and
the dtype most weights are served in. ``comparison.json``: each baseline re-scored on the same sentences, a
paired bootstrap confidence interval of the macro-F1 difference (model minus baseline), and a plain verdict
against the best baseline; ``comparison.png`` shows the scores side by side.

When the model was trained on another subset, test sentences that were in its training split are left out
(the agreement subsets overlap), and the files say how many.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fintune import LABELS
from fintune.baselines import COMPARISON_FILE, load_pipeline, run_baselines
from fintune.config import InferenceSettings, Settings
from fintune.data import DataSplits, Example, load_splits
from fintune.errors import ArtifactError
from fintune.evaluation import (
    classification_metrics,
    latency_percentiles,
    plot_comparison,
    plot_reliability,
    write_classification_artifacts,
    write_json,
)
from fintune.model.calibration import calibration_error, card_temperature, reliability_bins
from fintune.model.card import read_card
from fintune.provenance import provenance

logger = logging.getLogger(__name__)


class Classifier(Protocol):
    """What evaluation needs of a model: label probabilities in LABELS order."""

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """An (n, 3) array of probabilities."""
        ...


def load_classifier(model_dir: Path, settings: Settings, temperature: float | None = None) -> Classifier:
    """The trained model in ``model_dir``, QLoRA or encoder, as its card says (imports only what it needs), with
    its card's temperature unless ``temperature`` is given."""
    card = read_card(model_dir)
    if card.get("backend") == "encoder":
        from fintune.model.encoder import EncoderClassifier

        return EncoderClassifier.from_pretrained(model_dir, settings, temperature)
    from fintune.model.inference import SentimentClassifier

    return SentimentClassifier.from_pretrained(model_dir, settings, temperature=temperature)


def memory_figures(classifier: Classifier) -> dict[str, float | None]:
    """The loaded model's parameter and buffer bytes, as served, and this process's peak resident memory (MiB)."""
    model = getattr(classifier, "model", None)
    footprint = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return {
        "model_memory_footprint_mib": round(footprint / 2**20, 1) if footprint is not None else None,
        "process_peak_rss_mib": round(peak_bytes / 2**20, 1),
    }


def weights_dtype(classifier: Classifier) -> str | None:
    """The dtype that holds most of the served model's weights ("float32", "bfloat16"; None without a torch model):
    what ``inference.dtype: auto`` chose on this machine."""
    model = getattr(classifier, "model", None)
    if not hasattr(model, "parameters"):
        return None
    counts: Counter[str] = Counter()
    for param in model.parameters():
        counts[str(param.dtype).removeprefix("torch.")] += param.numel()
    return counts.most_common(1)[0][0] if counts else None


def unseen_test_examples(settings: Settings, splits: DataSplits, card: dict[str, Any]) -> list[Example]:
    """The test split minus sentences the model trained on or was selected and calibrated on (its validation
    split; only possible when it trained on another subset).

    The model's training split is rebuilt with these settings, so it must be the one in the card (same data
    fingerprint): a model trained with another split seed or other fractions would be scored on its own
    training sentences, and that is an :class:`ArtifactError`.
    """
    data = card.get("data", {})
    trained_on, fingerprint = data.get("subset"), data.get("fingerprint")
    if not trained_on:
        return list(splits.test)
    training = splits if trained_on == splits.subset else load_splits(settings, trained_on)
    if fingerprint and training.fingerprint != fingerprint:
        raise ArtifactError(
            f"the model was trained on a {trained_on} split with fingerprint {fingerprint[:16]}, but these settings "
            f"make {training.fingerprint[:16]} (another split seed, fractions or data file): its test figures "
            "would include training sentences; evaluate with the settings it was trained with"
        )
    if training is splits:
        return list(splits.test)
    seen = {ex.text for ex in (*training.train, *training.validation)}  # validation chose and calibrated it
    return [ex for ex in splits.test if ex.text not in seen]


def macro_f1_codes(truth: np.ndarray, predicted: np.ndarray, k: int = len(LABELS)) -> float:
    """Macro-F1 of integer-coded labels, over the classes present in truth or prediction (as sklearn does)."""
    counts = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
    tp = np.diag(counts).astype(float)
    denominator = 2 * tp + (counts.sum(axis=0) - tp) + (counts.sum(axis=1) - tp)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    present = denominator > 0
    return float(f1[present].mean()) if present.any() else 0.0


def bootstrap_difference(
    truth: np.ndarray, ours: np.ndarray, theirs: np.ndarray, samples: int, level: float, seed: int
) -> dict[str, float]:
    """Paired bootstrap of macro-F1(ours) - macro-F1(theirs): point estimate and the ``level`` interval."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    differences = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        differences[i] = macro_f1_codes(truth[idx], ours[idx]) - macro_f1_codes(truth[idx], theirs[idx])
    tail = (1 - level) / 2 * 100
    return {
        "difference": round(macro_f1_codes(truth, ours) - macro_f1_codes(truth, theirs), 4),
        "ci_low": round(float(np.percentile(differences, tail)), 4),
        "ci_high": round(float(np.percentile(differences, 100 - tail)), 4),
        "share_model_better": round(float((differences > 0).mean()), 4),
    }


def score_model(classifier: Classifier, examples: list[Example], inference: InferenceSettings) -> dict[str, Any]:
    """Metrics, calibration, latency and throughput of a classifier on ``examples``."""
    texts = [ex.text for ex in examples]
    started = time.perf_counter()
    probabilities = classifier.predict_proba(texts)
    elapsed = time.perf_counter() - started
    predicted = [LABELS[int(i)] for i in probabilities.argmax(axis=1)]
    metrics = classification_metrics([ex.label for ex in examples], predicted)
    correct = np.array([p == ex.label for p, ex in zip(predicted, examples, strict=True)])
    bins = reliability_bins(probabilities, correct, inference.calibration_bins)
    metrics["expected_calibration_error"] = round(calibration_error(bins), 4)
    metrics["reliability_bins"] = [
        {key: value if key == "count" else round(value, 4) for key, value in row.items()} for row in bins
    ]
    latency = latency_percentiles(lambda t: classifier.predict_proba([t]), texts, inference.latency_samples)
    metrics.update(
        sentences=len(texts),
        latency_p50_ms=latency["p50_ms"],
        latency_p95_ms=latency["p95_ms"],
        batch_ms_per_sentence=round(1000 * elapsed / max(len(texts), 1), 3),
        throughput_per_s=round(len(texts) / max(elapsed, 1e-9), 2),
        predictions=predicted,
    )
    return metrics


def baseline_comparison_file(settings: Settings, splits: DataSplits) -> Path:
    """The baselines' comparison.json of this subset, trained now when absent."""
    folder = settings.output_dir / "baselines" / splits.subset
    path = folder / COMPARISON_FILE
    if not path.is_file():
        logger.info("no baselines for %s yet: training them into %s", splits.subset, folder)
        run_baselines(splits, settings.baselines, folder, command=f"fintune baselines --subset {splits.subset}")
    return path


def compare_with_baselines(
    settings: Settings, splits: DataSplits, examples: list[Example], model_predicted: list[str]
) -> dict[str, Any]:
    """Each baseline on the same sentences, the bootstrap CI of the macro-F1 difference, and the verdict."""
    path = baseline_comparison_file(settings, splits)
    try:
        baselines = json.loads(path.read_text(encoding="utf-8"))
        fingerprint, names = baselines["data"]["fingerprint"], list(baselines["models"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"the baselines' {path} is unreadable ({type(exc).__name__}: {exc}); re-run "
                            f"`fintune baselines --subset {splits.subset} --output-dir {path.parent}`") from exc
    if fingerprint != splits.fingerprint:
        raise ArtifactError(
            f"the baselines in {path.parent} were trained on other data (fingerprint "
            f"{fingerprint[:12]} vs {splits.fingerprint[:12]}); re-run "
            f"`fintune baselines --subset {splits.subset} --output-dir {path.parent}`"
        )
    codes = {label: i for i, label in enumerate(LABELS)}
    truth = np.array([codes[ex.label] for ex in examples])
    ours = np.array([codes[label] for label in model_predicted])
    texts = [ex.text for ex in examples]
    inference = settings.model.inference
    results: dict[str, Any] = {}
    for name in names:
        predicted = list(load_pipeline(path.parent / f"{name}.joblib").predict(texts))
        scores = classification_metrics([ex.label for ex in examples], predicted)
        theirs = np.array([codes[label] for label in predicted])
        results[name] = {
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "latency_p50_ms": baselines["models"][name].get("latency_p50_ms"),
            "macro_f1_difference": bootstrap_difference(
                truth, ours, theirs, inference.bootstrap_samples, inference.confidence_level, settings.seed
            ),
        }
    best = max(results, key=lambda n: results[n]["macro_f1"])
    return {"baselines": results, "best_baseline": best,
            "verdict": verdict(best, results[best], inference.confidence_level)}


def verdict(name: str, best: dict[str, Any], level: float) -> str:
    """One plain sentence: did the model earn its complexity over the best baseline?"""
    diff = best["macro_f1_difference"]
    interval = f"{diff['difference']:+.3f} macro-F1, {level:.0%} CI [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
    if diff["ci_low"] > 0:
        return f"yes: the model beats the best baseline ({name}) by {interval}; it earned its complexity."
    if diff["ci_high"] < 0:
        return f"no: the model is worse than the best baseline ({name}): {interval}; use the baseline."
    return (f"not proven: against the best baseline ({name}) the difference is {interval}, which includes 0; "
            "the extra cost is not yet justified.")


def scoring_settings(settings: Settings, card: dict[str, Any]) -> dict[str, Any]:
    """The settings that decided how the model was scored (the command line does not show FINTUNE_* overrides):
    the profile and its ``inference`` section, and the ``encoder`` section for an encoder."""
    scored = {"profile": settings.profile, "inference": settings.model.inference.model_dump(mode="json")}
    if card.get("backend") == "encoder":
        scored["encoder"] = settings.model.encoder.model_dump(mode="json")
    return scored


def evaluate(model_dir: Path, settings: Settings, subset: str, out_dir: Path, command: str) -> dict[str, Any]:
    """Write ``metrics.json`` (+ report and confusion files) and ``comparison.json`` into ``out_dir``."""
    card = read_card(model_dir)
    splits = load_splits(settings, subset)
    examples = unseen_test_examples(settings, splits, card)
    classifier = load_classifier(model_dir, settings)
    metrics = score_model(classifier, examples, settings.model.inference)
    metrics.update(memory_figures(classifier))
    metrics["weights_dtype"] = weights_dtype(classifier)
    predicted = metrics.pop("predictions")
    left_out = len(splits.test) - len(examples)
    header = {
        "provenance": provenance(command),
        "model": {"dir": str(model_dir), "backend": card.get("backend", "qlora"), "profile": card.get("profile"),
                  "base_model": card.get("base_model"), "trained_on": card.get("data", {}).get("subset"),
                  "trained_fingerprint": card.get("data", {}).get("fingerprint"),
                  "temperature": card_temperature(card)},
        "data": {**splits.describe(), "evaluated_sentences": len(examples), "left_out_seen_in_training": left_out},
        "scored_with": scoring_settings(settings, card),
    }
    # compared first: baselines that cannot be compared with must leave no new file beside an old evaluation's
    comparison = {**header, "model_scores": {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                             "latency_p50_ms": metrics["latency_p50_ms"]},
                  **compare_with_baselines(settings, splits, examples, predicted)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_classification_artifacts(metrics, out_dir, "model")
    write_json(out_dir / "metrics.json", {**header, **metrics})
    write_json(out_dir / "comparison.json", comparison)
    write_plots(metrics, comparison, out_dir, f"{card.get('profile') or model_dir.name}, {splits.subset} test")
    return {"metrics": metrics, "comparison": comparison}


def write_plots(metrics: dict[str, Any], comparison: dict[str, Any], out_dir: Path, title: str) -> list[Path]:
    """``model_reliability.png`` (confidence against accuracy) and ``comparison.png`` (model beside baselines)."""
    scores = {"model": comparison["model_scores"], **comparison["baselines"]}
    return [
        plot_reliability(metrics["reliability_bins"], out_dir / "model_reliability.png",
                         f"{title}: ECE {metrics['expected_calibration_error']:.3f}"),
        plot_comparison(scores, out_dir / "comparison.png", f"{title}: model vs TF-IDF baselines"),
    ]
