"""The QLoRA path end to end on tiny-mistral: NF4 base + LoRA + SFTTrainer, save, reload, identical scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bitsandbytes.nn import Linear4bit

from fintune import LABELS
from fintune.config import Settings
from fintune.data import load_splits
from fintune.errors import ArtifactError
from fintune.model.card import is_trained
from fintune.model.inference import SentimentClassifier
from fintune.model.training import last_checkpoint, train

pytestmark = pytest.mark.slow


def test_two_steps_train_save_reload_identical_scores(tiny_settings: Settings) -> None:
    splits = load_splits(tiny_settings)
    result = train(tiny_settings, max_steps=2, splits=splits)
    out = result.output_dir
    card = json.loads((out / "fintune.json").read_text())
    assert card["global_steps"] == 2
    assert card["data"]["fingerprint"] == splits.fingerprint
    assert 0 < card["trainable_params"] < card["total_params"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "loss_curve.png",
                 "drift_baseline.json", "validation_report.json"):
        assert (out / name).is_file(), name
    assert last_checkpoint(out) is not None
    assert is_trained(out, "tiny-mistral", splits.fingerprint)
    assert not is_trained(out, "tiny-mistral", "another-fingerprint")

    texts = [ex.text for ex in splits.test]
    unmerged = SentimentClassifier.from_pretrained(out, tiny_settings, merge=False)
    assert any(isinstance(m, Linear4bit) for m in unmerged.model.modules())  # really NF4
    first = unmerged.predict_proba(texts)
    np.testing.assert_array_equal(result.classifier.predict_proba(texts), first)  # in memory == reloaded
    np.testing.assert_allclose(first.sum(axis=1), 1.0, rtol=1e-6)

    merged = SentimentClassifier.from_pretrained(out, tiny_settings, merge=True)
    assert not any(isinstance(m, Linear4bit) for m in merged.model.modules())
    np.testing.assert_allclose(merged.predict_proba(texts), first, atol=0.02)


def test_predictions_are_always_one_of_the_labels_and_padding_does_not_change_scores(
    tiny_settings: Settings,
) -> None:
    out = train(tiny_settings, max_steps=1, splits=load_splits(tiny_settings)).output_dir
    classifier = SentimentClassifier.from_pretrained(out, tiny_settings, merge=False)
    texts = ["Profit rose .", "Operating profit fell to EUR 3.1 mn from EUR 30.0 mn in the corresponding period ."]
    predictions = classifier.predict(texts)
    assert all(p.label in LABELS and p.confidence == max(p.probabilities.values()) for p in predictions)
    alone = classifier.predict_proba(texts[:1])  # no padding
    together = classifier.predict_proba(texts)  # left-padded beside a longer sentence
    np.testing.assert_allclose(together[0], alone[0], atol=1e-3)


def test_resumes_from_its_last_checkpoint(tiny_settings: Settings) -> None:
    splits = load_splits(tiny_settings)
    out = train(tiny_settings, max_steps=1, splits=splits).output_dir
    resumed = train(tiny_settings, output_dir=out, max_steps=2, splits=splits)
    assert resumed.card["resumed"] is True
    assert resumed.card["global_steps"] == 2


def test_loading_a_folder_without_an_adapter_says_what_to_do(tiny_settings: Settings) -> None:
    with pytest.raises(ArtifactError, match="fintune train"):
        SentimentClassifier.from_pretrained(tiny_settings.output_dir, tiny_settings)
