"""`fintune evaluate`'s leakage guard: test figures never include sentences the model trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

from fintune.config import load_settings
from fintune.data import load_splits
from fintune.errors import ArtifactError
from fintune.model.assessment import compare_with_baselines, unseen_test_examples


def _card(subset: str, fingerprint: str) -> dict:
    return {"data": {"subset": subset, "fingerprint": fingerprint}}


def test_the_whole_test_split_when_the_model_trained_on_this_split(tiny_data_dir: Path) -> None:
    settings = load_settings("tiny-mistral", data_dir=tiny_data_dir)
    splits = load_splits(settings, "50agree")
    assert unseen_test_examples(settings, splits, _card("50agree", splits.fingerprint)) == splits.test


def test_another_subset_loses_the_sentences_the_model_trained_on(tiny_data_dir: Path) -> None:
    lines = (tiny_data_dir / "Sentences_AllAgree.txt").read_text(encoding="utf-8").splitlines()
    (tiny_data_dir / "Sentences_AllAgree.txt").write_text("\n".join(lines[::2]) + "\n", encoding="utf-8")
    settings = load_settings("tiny-mistral", data_dir=tiny_data_dir)
    allagree, fifty = load_splits(settings, "allagree"), load_splits(settings, "50agree")
    kept = unseen_test_examples(settings, allagree, _card("50agree", fifty.fingerprint))
    seen = {ex.text for ex in (*fifty.train, *fifty.validation)}  # trained on, and calibrated on
    assert not seen & {ex.text for ex in kept}
    assert len(kept) < len(allagree.test)  # allagree's own split put some 50agree training sentences in its test


@pytest.mark.parametrize("subset", ["50agree", "allagree"])
def test_a_model_trained_on_another_split_of_the_data_is_refused(tiny_data_dir: Path, subset: str) -> None:
    trained_with = load_settings("tiny-mistral", data_dir=tiny_data_dir)
    trained_with = trained_with.model_copy(update={"data": trained_with.data.model_copy(update={"split_seed": 7})})
    card = _card("50agree", load_splits(trained_with, "50agree").fingerprint)
    settings = load_settings("tiny-mistral", data_dir=tiny_data_dir)  # the default split seed
    with pytest.raises(ArtifactError, match="evaluate with the settings it was trained with"):
        unseen_test_examples(settings, load_splits(settings, subset), card)


def test_macro_f1_matches_sklearn_also_when_a_class_is_absent() -> None:
    import numpy as np
    from sklearn.metrics import f1_score

    from fintune import LABELS
    from fintune.evaluation import classification_metrics
    from fintune.model.assessment import macro_f1_codes

    rng = np.random.default_rng(0)
    for classes in ([0, 1, 2], [1, 2], [2]):  # the last: every sentence of one class, all predicted right
        truth = rng.choice(classes, size=40)
        predicted = truth.copy() if len(classes) == 1 else rng.choice(classes, size=40)
        expected = f1_score(truth, predicted, average="macro")
        assert macro_f1_codes(truth, predicted) == pytest.approx(expected)
        names = [LABELS[i] for i in truth], [LABELS[i] for i in predicted]
        assert classification_metrics(*names)["macro_f1"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("content", ['{"data": {"fingerprint": "94aea96d', '{"models": {}}', "[]"])
def test_an_unreadable_baseline_comparison_is_an_error_saying_what_to_do(
    tiny_data_dir: Path, tmp_path: Path, content: str
) -> None:
    settings = load_settings("tiny-mistral", data_dir=tiny_data_dir, output_dir=tmp_path)
    splits = load_splits(settings, "50agree")
    folder = tmp_path / "baselines" / "50agree"
    folder.mkdir(parents=True)
    (folder / "comparison.json").write_text(content)  # a write cut short, or another tool's file
    with pytest.raises(ArtifactError, match="unreadable.*re-run `fintune baselines --subset 50agree"):
        compare_with_baselines(settings, splits, splits.test, [ex.label for ex in splits.test])  # was a traceback
