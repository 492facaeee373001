"""TF-IDF baselines: LogisticRegression, RandomForest and LinearSVC, the floor a fine-tuned model must beat.

Each baseline is a scikit-learn ``Pipeline`` (TF-IDF word n-grams + a linear or tree classifier) registered in
:data:`BASELINES`; adding one is one entry. :func:`run_baselines` trains every configured baseline on the train
split, scores it on the test split with :mod:`fintune.evaluation`, and writes ``comparison.json`` (with the data
fingerprint), a report and confusion matrix per model (JSON + PNG), a comparison plot and the fitted pipelines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import joblib
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

from fintune.config import BaselineSettings
from fintune.data import DataSplits
from fintune.errors import ArtifactError, ConfigError
from fintune.evaluation import (
    batch_throughput,
    classification_metrics,
    latency_percentiles,
    plot_comparison,
    replace_atomically,
    write_classification_artifacts,
    write_json,
)
from fintune.provenance import provenance

logger = logging.getLogger(__name__)

ClassifierFactory = Callable[[BaselineSettings], Any]

BASELINES: dict[str, ClassifierFactory] = {
    "logistic_regression": lambda cfg: LogisticRegression(
        solver="saga", max_iter=3000, C=10.0, class_weight=cfg.class_weight, random_state=cfg.random_state
    ),
    "random_forest": lambda cfg: RandomForestClassifier(
        n_estimators=cfg.random_forest_trees, class_weight=cfg.class_weight, n_jobs=-1,
        random_state=cfg.random_state,
    ),
    "linear_svc": lambda cfg: LinearSVC(C=1.0, class_weight=cfg.class_weight, random_state=cfg.random_state),
}
"""Baseline name -> factory of its classifier (the TF-IDF step is shared)."""

COMPARISON_FILE = "comparison.json"


def build_pipeline(name: str, cfg: BaselineSettings) -> Pipeline:
    """TF-IDF (word 1..ngram_max grams) followed by the classifier registered as ``name``."""
    vectorizer = TfidfVectorizer(ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, sublinear_tf=cfg.sublinear_tf)
    return Pipeline([("tfidf", vectorizer), ("classifier", BASELINES[name](cfg))])


def evaluate_pipeline(pipeline: Pipeline, splits: DataSplits, cfg: BaselineSettings) -> dict[str, Any]:
    """Test-split metrics, single-sentence latency p50/p95 and batch throughput of a fitted pipeline."""
    texts = [example.text for example in splits.test]
    predictions = pipeline.predict(texts)
    metrics = classification_metrics([example.label for example in splits.test], list(predictions))
    latency = latency_percentiles(lambda text: pipeline.predict([text]), texts, cfg.latency_samples)
    return {
        **metrics,
        "latency_p50_ms": latency["p50_ms"],
        "latency_p95_ms": latency["p95_ms"],
        "throughput_per_s": batch_throughput(pipeline.predict, texts),
    }


def train_and_score(name: str, splits: DataSplits, cfg: BaselineSettings) -> tuple[Pipeline, dict[str, Any]]:
    """Fit baseline ``name`` on the train split and score it on the test split."""
    pipeline = build_pipeline(name, cfg)
    start = time.perf_counter()
    try:
        pipeline.fit([e.text for e in splits.train], [e.label for e in splits.train])
    except ValueError as exc:  # the TF-IDF settings leave no term (min_df above the corpus, say)
        raise ConfigError(f"baseline {name} cannot be fitted with these baselines settings: {exc}") from None
    fit_seconds = time.perf_counter() - start
    _predict_on_one_thread(pipeline)
    result = evaluate_pipeline(pipeline, splits, cfg)
    return pipeline, {"fit_seconds": round(fit_seconds, 3), **result}


def _predict_on_one_thread(pipeline: Pipeline) -> None:
    """Predict as served, one thread per request: thread start-up would dominate one-sentence latency."""
    classifier = pipeline.named_steps["classifier"]
    if "n_jobs" in classifier.get_params():
        classifier.set_params(n_jobs=1)


def run_baselines(
    splits: DataSplits,
    cfg: BaselineSettings,
    output_dir: Path,
    command: str = "fintune baselines",
    progress: Callable[[Iterable[str]], Iterable[str]] = iter,
) -> dict[str, Any]:
    """Train, score and save every configured baseline; returns what ``comparison.json`` holds."""
    started = time.perf_counter()
    # the folder's comparison (and its fingerprint) speaks for pipelines about to be replaced: gone until this
    # run writes its own, so a run cut short never leaves new pipelines under an old fingerprint for evaluate
    (output_dir / COMPARISON_FILE).unlink(missing_ok=True)
    models: dict[str, dict[str, Any]] = {}
    for name in progress(cfg.models):
        pipeline, result = train_and_score(name, splits, cfg)
        logger.info("%s: accuracy %.3f, macro-F1 %.3f, fit %.1fs", name, result["accuracy"],
                    result["macro_f1"], result["fit_seconds"])
        write_classification_artifacts(result, output_dir, name)
        replace_atomically(output_dir / f"{name}.joblib", lambda path, fitted=pipeline: joblib.dump(fitted, path))
        models[name] = result
    comparison = {
        "provenance": provenance(command),
        "data": splits.describe(),
        "settings": cfg.model_dump(),
        "best_by_macro_f1": max(models, key=lambda n: models[n]["macro_f1"]),
        "total_seconds": round(time.perf_counter() - started, 2),
        "models": models,
    }
    write_json(output_dir / COMPARISON_FILE, comparison)
    plot_comparison(models, output_dir / "comparison.png", title=f"TF-IDF baselines, {splits.subset} test split")
    return comparison


def load_pipeline(path: Path) -> Pipeline:
    """A fitted baseline pipeline saved by :func:`run_baselines` (the serving fallback uses it)."""
    if not path.is_file():
        raise ArtifactError(f"no fitted baseline at {path}; run `fintune baselines --subset S --output-dir "
                            f"{path.parent}` first, S the subset it should learn")
    return joblib.load(path)
