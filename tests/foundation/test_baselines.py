"""TF-IDF baselines: every configured model is trained, scored and saved, with the data fingerprint."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from fintune.baselines import BASELINES, load_pipeline, run_baselines
from fintune.config import load_settings
from fintune.data import load_splits
from fintune.errors import ArtifactError

REQUIRED_KEYS = {"accuracy", "macro_f1", "per_class", "fit_seconds", "latency_p50_ms", "latency_p95_ms",
                 "throughput_per_s"}


def small_settings(data_dir: Path | None = None):
    settings = load_settings("cpu", data_dir=data_dir)
    fast = settings.baselines.model_copy(update={"latency_samples": 10, "random_forest_trees": 10})
    return settings.model_copy(update={"baselines": fast})


def test_writes_every_artifact_for_every_model(tiny_data_dir: Path, tmp_path: Path) -> None:
    settings = small_settings(tiny_data_dir)
    splits = load_splits(settings)
    out = tmp_path / "out"
    comparison = run_baselines(splits, settings.baselines, out, command="pytest")
    saved = json.loads((out / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(comparison))
    assert list(saved["models"]) == list(BASELINES)
    assert saved["data"]["fingerprint"] == splits.fingerprint
    assert saved["provenance"]["command"] == "pytest" and saved["provenance"]["machine"]["cores"]
    for name, result in saved["models"].items():
        assert set(result) >= REQUIRED_KEYS, name
        assert set(result["per_class"]) == {"negative", "neutral", "positive"}
        for suffix in ("_report.json", "_confusion.json", "_confusion.png", ".joblib"):
            assert (out / f"{name}{suffix}").stat().st_size > 0
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The templates are separable: a working pipeline must get them right, a broken one cannot.
    assert saved["models"]["logistic_regression"]["accuracy"] == 1.0


def test_saved_pipeline_predicts_like_the_trained_one(tiny_data_dir: Path, tmp_path: Path) -> None:
    settings = small_settings(tiny_data_dir)
    run_baselines(load_splits(settings), settings.baselines, tmp_path, command="pytest")
    pipeline = load_pipeline(tmp_path / "linear_svc.joblib")
    assert list(pipeline.predict(["Operating profit fell to EUR 3.1 mn from EUR 40.0 mn ."])) == ["negative"]
    with pytest.raises(ArtifactError, match=f"run `fintune baselines --subset S --output-dir {tmp_path}` first"):
        load_pipeline(tmp_path / "missing.joblib")


def test_a_run_cut_short_leaves_no_comparison_to_vouch_for_its_new_pipelines(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    settings = small_settings(tiny_data_dir)
    splits = load_splits(settings)
    run_baselines(splits, settings.baselines, tmp_path, command="pytest")

    def killed_after_the_first(names: Iterable[str]) -> Iterator[str]:
        for i, name in enumerate(names):
            if i == 1:
                raise KeyboardInterrupt
            yield name

    with pytest.raises(KeyboardInterrupt):  # the first pipeline is replaced, the others are still the old run's
        run_baselines(splits, settings.baselines, tmp_path, command="pytest", progress=killed_after_the_first)
    # evaluate trusted the old comparison's fingerprint for every joblib beside it; it now finds none and retrains
    assert not (tmp_path / "comparison.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written is left behind


def test_a_write_that_fails_leaves_the_previous_file(tmp_path: Path) -> None:
    from fintune.evaluation import replace_atomically, write_json

    path = write_json(tmp_path / "comparison.json", {"kept": True})

    def cut_short(temporary: Path) -> None:
        temporary.write_text('{"trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(path, cut_short)
    assert json.loads(path.read_text()) == {"kept": True} and list(tmp_path.iterdir()) == [path]


@pytest.mark.needs_data
def test_real_50agree_baselines_beat_the_majority_class(shared_data_dir: Path, tmp_path: Path) -> None:
    settings = small_settings()
    splits = load_splits(settings, "50agree")
    comparison = run_baselines(splits, settings.baselines, tmp_path, command="pytest")
    majority = max(splits.describe()["label_counts"]["test"].values()) / len(splits.test)
    for name in ("logistic_regression", "linear_svc"):
        assert comparison["models"][name]["accuracy"] > majority + 0.1, name
