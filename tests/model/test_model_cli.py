"""`fintune train`, `fintune evaluate` and `fintune lora-report` as a user runs them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from fintune.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_env(tiny_data_dir: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FINTUNE_* pointing at the tiny PhraseBank, the session's model cache and a fresh output folder."""
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("FINTUNE_CACHE_DIR", str(model_cache))
    monkeypatch.setenv("FINTUNE_OUTPUT_DIR", str(tmp_path / "out"))
    return tmp_path / "out"


def test_train_then_evaluate_writes_metrics_and_a_verdict(tiny_env: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_MODEL__TRAINING__VALIDATION_LIMIT", "5")  # of the 6 validation sentences
    model_dir = tiny_env / "tiny"
    args = ["train", "--profile", "tiny-mistral", "--output-dir", str(model_dir), "--max-steps", "2"]
    assert main(args) == 0
    assert json.loads((model_dir / "fintune.json").read_text())["global_steps"] == 2
    assert main([*args, "--skip-if-trained"]) == 0
    assert "skipped" in capsys.readouterr().out
    card_before = (model_dir / "fintune.json").read_text()
    assert main(args) != 0  # a finished model is never silently resumed or replaced
    assert "--overwrite" in capsys.readouterr().err
    assert (model_dir / "fintune.json").read_text() == card_before
    assert main([*args[:-1], "1", "--overwrite"]) == 0
    replaced = json.loads((model_dir / "fintune.json").read_text())
    assert (replaced["global_steps"], replaced["resumed"], replaced["max_steps"]) == (1, False, 1)
    assert main([*args, "--skip-if-trained"]) != 0  # a 1-step trial is not the profile's 2-step training
    assert "trial run of --max-steps 1" in capsys.readouterr().err

    card = json.loads((model_dir / "fintune.json").read_text())
    fitted = card["calibration"]["temperature"]
    assert fitted != 1.0
    card["calibration"]["temperature"] = 1.0  # as if never calibrated: calibrate must find the fit again
    (model_dir / "fintune.json").write_text(json.dumps(card))
    assert main(["calibrate", "--profile", "tiny-mistral", "--model", str(model_dir)]) == 0
    refitted = json.loads((model_dir / "fintune.json").read_text())["calibration"]
    assert refitted["temperature"] == pytest.approx(fitted, rel=0.01)
    assert refitted["sentences"] == 5  # on the sentences training calibrated on (training.validation_limit)
    card = json.loads((model_dir / "fintune.json").read_text())
    card["calibration"]["temperature"] = 0  # an edited or damaged card: every probability came out NaN, silently
    (model_dir / "fintune.json").write_text(json.dumps(card))
    assert main(["evaluate", "--profile", "tiny-mistral", "--model", str(model_dir)]) == 2
    assert "calibration.temperature is 0, not a number above 0: refit it with `fintune calibrate" in (
        capsys.readouterr().err)
    broken = tiny_env / "no-weights"  # a calibrate that fails must leave the card as it found it
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("checkpoints", "adapter_model.safetensors"))
    assert main(["calibrate", "--profile", "tiny-mistral", "--model", str(broken)]) == 2
    assert json.loads((broken / "fintune.json").read_text())["calibration"]["temperature"] == 0  # was erased
    capsys.readouterr()
    assert main(["calibrate", "--profile", "tiny-mistral", "--model", str(model_dir)]) == 0  # which mends it
    assert json.loads((model_dir / "fintune.json").read_text())["calibration"]["temperature"] == pytest.approx(
        fitted, rel=0.01)
    readme = (model_dir / "README.md").read_text()  # follows the card
    assert f"temperature {refitted['temperature']:.3f}, validation ECE {refitted['ece_before']} -> " in readme

    eval_dir = tiny_env / "eval"
    assert main(["evaluate", "--profile", "tiny-mistral", "--model", str(model_dir), "--subset", "50agree",
                 "--output-dir", str(eval_dir)]) == 0
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "expected_calibration_error",
                "latency_p50_ms", "latency_p95_ms", "throughput_per_s"):
        assert key in metrics, key
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["sentences"] > 0
    assert 0 < metrics["model_memory_footprint_mib"] < metrics["process_peak_rss_mib"]
    assert metrics["weights_dtype"] == "bfloat16"  # merged into the profile's pinned dtype
    bins = metrics["reliability_bins"]
    assert sum(row["count"] for row in bins) == metrics["sentences"]
    assert metrics["expected_calibration_error"] == pytest.approx(
        sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in bins) / metrics["sentences"], abs=1e-3
    )
    for plot in ("model_confusion.png", "model_reliability.png", "comparison.png"):
        assert (eval_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    comparison = json.loads((eval_dir / "comparison.json").read_text())
    best = comparison["baselines"][comparison["best_baseline"]]["macro_f1_difference"]
    assert best["ci_low"] <= best["difference"] <= best["ci_high"]
    assert comparison["verdict"].split(":")[0] in {"yes", "no", "not proven"}

    baselines = tiny_env / "baselines" / "50agree" / "comparison.json"
    stale = json.loads(baselines.read_text())
    stale["data"]["fingerprint"] = "0" * 64  # baselines of other data: evaluate refuses them...
    baselines.write_text(json.dumps(stale))
    before = {path.name: path.read_bytes() for path in eval_dir.iterdir()}
    assert main(["evaluate", "--profile", "tiny-mistral", "--model", str(model_dir), "--subset", "50agree",
                 "--output-dir", str(eval_dir)]) == 2
    assert "trained on other data" in capsys.readouterr().err
    # ...before writing anything: a new metrics.json used to sit beside the last run's comparison and plots
    assert {path.name: path.read_bytes() for path in eval_dir.iterdir()} == before


def test_lora_report_prints_the_exact_mistral_count(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    saved = tmp_path / "report.json"
    args = ["lora-report", "--profile", "mistral-7b", "--output", str(saved)]
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/fintune", *args])  # the provenance is the command as typed
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 13_631_488
    assert {"total_params", "target_modules", "bf16_bytes", "nf4_bytes"} <= set(report)
    written = json.loads(saved.read_text())
    assert written["provenance"]["command"] == "fintune " + " ".join(args)
    assert {k: v for k, v in written.items() if k != "provenance"} == report


def test_lora_report_names_the_layers_when_a_target_matches_none(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINTUNE_MODEL__LORA__TARGET_MODULES", '["c_attn"]')
    assert main(["lora-report", "--profile", "mistral-7b"]) == 2
    error = capsys.readouterr().err
    assert "['c_attn'] name no layer of MistralForCausalLM" in error and "'q_proj'" in error
    assert "Traceback" not in error
    monkeypatch.delenv("FINTUNE_MODEL__LORA__TARGET_MODULES")
    assert main(["lora-report", "--profile", "encoder"]) == 2
    assert "sizes the adapter of a QLoRA profile" in capsys.readouterr().err


def test_another_subset_trains_beside_the_default_model_and_evaluates_with_its_own_profile(
    tiny_env: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", "--profile", "tiny-mistral", "--subset", "allagree", "--max-steps", "1"]) == 0
    folder = tiny_env / "models" / "tiny-mistral-allagree"  # not tiny-mistral/, the profile's served model
    assert json.loads((folder / "fintune.json").read_text())["data"]["subset"] == "allagree"
    assert not (tiny_env / "models" / "tiny-mistral").exists()
    assert main(["evaluate", "--model", str(folder)]) == 0  # no --profile: the card's, not the default cpu
    metrics = json.loads((folder / "eval" / "allagree" / "metrics.json").read_text())
    assert metrics["weights_dtype"] == "bfloat16"  # tiny-mistral's pinned dtype; cpu's auto gives fp32 here


def test_evaluate_a_folder_without_a_model_is_one_error_line(tiny_env: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--profile", "tiny-mistral", "--model", str(tiny_env / "nothing")]) != 0
    assert "fintune train" in capsys.readouterr().err


def test_overwrite_also_clears_an_interrupted_run(tiny_env: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = tiny_env / "interrupted"
    left = model_dir / "checkpoints" / "checkpoint-1"  # left by a run of unknown settings
    left.mkdir(parents=True)
    (left / "trainer_state.json").write_text("{}")  # complete: an incomplete one is skipped, not refused
    args = ["train", "--profile", "tiny-mistral", "--output-dir", str(model_dir), "--max-steps", "1"]
    assert main(args) == 2
    assert "checkpoints of another run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((model_dir / "fintune.json").read_text())["resumed"] is False


def test_the_encoder_trains_from_the_teacher_it_is_given_and_says_when_it_has_none(
    tiny_env: Path, capsys: pytest.CaptureFixture
) -> None:
    teacher, student = tiny_env / "teacher", tiny_env / "student"
    assert main(["train", "--profile", "tiny-mistral", "--output-dir", str(teacher), "--max-steps", "1"]) == 0
    encoder = ["train", "--profile", "encoder", "--output-dir", str(student), "--max-steps", "1"]
    assert main(encoder) != 0  # the profile's teacher, <output_dir>/models/cpu, was never trained here
    assert "fintune train --profile cpu" in capsys.readouterr().err
    assert main([*encoder, "--teacher", str(teacher)]) == 0
    card = json.loads((student / "fintune.json").read_text())
    assert card["distillation"]["teacher"] == str(teacher) and card["distillation"]["teacher_profile"] == "tiny-mistral"
    capsys.readouterr()
    trained = (student / "fintune.json").read_text()
    assert main([*encoder, "--teacher", str(tiny_env / "typo"), "--overwrite"]) == 2  # checked before replacing
    assert "holds none" in capsys.readouterr().err
    assert (student / "fintune.json").read_text() == trained
    assert main(["train", "--profile", "tiny-mistral", "--teacher", str(teacher)]) != 0
    assert "only the encoder" in capsys.readouterr().err


def test_evaluate_scores_the_subset_the_model_trained_on_unless_told(tiny_env: Path) -> None:
    model_dir = tiny_env / "allagree"
    assert main(["train", "--profile", "tiny-mistral", "--subset", "allagree", "--output-dir", str(model_dir),
                 "--max-steps", "1"]) == 0
    assert main(["evaluate", "--profile", "tiny-mistral", "--model", str(model_dir)]) == 0  # the profile says 50agree
    metrics = json.loads((model_dir / "eval" / "allagree" / "metrics.json").read_text())
    assert metrics["data"]["subset"] == "allagree"
