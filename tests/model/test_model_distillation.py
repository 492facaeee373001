"""The encoder learns from a teacher: batches, the mixed loss, finding and checking the teacher, a real distillation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fintune.config import Settings, load_settings
from fintune.data import load_splits
from fintune.errors import ArtifactError, ModelError
from fintune.model.card import CARD_FILE, card_version
from fintune.model.distillation import TeacherTargets, teacher_folder, teacher_targets
from fintune.model.encoder import batches, mixed_loss, train_encoder


def test_pooled_batches_cover_every_sentence_once_with_less_padding() -> None:
    lengths = [int(n) for n in torch.randint(5, 200, (1000,), generator=torch.Generator().manual_seed(0))]
    pooled = batches(lengths, 32, 8, torch.Generator().manual_seed(1))
    plain = batches(lengths, 32, 1, torch.Generator().manual_seed(1))
    for cut in (pooled, plain):
        assert sorted(i for batch in cut for i in batch) == list(range(1000))
        assert max(len(batch) for batch in cut) == 32

    def padded(cut: list[list[int]]) -> int:
        return sum(len(batch) * max(lengths[i] for i in batch) for batch in cut)

    assert padded(pooled) < 0.7 * padded(plain)
    assert plain[0] == torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()[:32]


def test_mixed_loss_is_label_cross_entropy_without_a_teacher_and_follows_the_teacher_with_one() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(mixed_loss(logits, labels, None, 0.9), cross_entropy)
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.allclose(mixed_loss(logits, labels, one_hot, 0.9), cross_entropy)  # a teacher agreeing fully
    teacher = torch.tensor([[0.2, 0.8, 0.0], [0.0, 1.0, 0.0]])
    logits.requires_grad_(True)
    mixed_loss(logits, labels, teacher, 1.0).backward()
    assert logits.grad is not None and logits.grad[0, 1] < 0 < logits.grad[0, 0]  # pulled toward the teacher


def test_the_configured_teacher_lives_under_the_output_folder(tmp_path: Path) -> None:
    settings = load_settings("encoder", output_dir=tmp_path)
    assert settings.model.encoder.distill_from == "cpu"
    assert teacher_folder(settings) == tmp_path / "models" / "cpu"
    assert teacher_folder(settings, "50agree") == tmp_path / "models" / "cpu"  # the profile's own subset
    assert teacher_folder(settings, "allagree") == tmp_path / "models" / "cpu-allagree"  # as `fintune train` names it
    labels_only = settings.model.encoder.model_copy(update={"distill_from": None})
    assert teacher_folder(settings.model_copy(update={"model": settings.model.model_copy(
        update={"encoder": labels_only})})) is None


def test_a_missing_teacher_or_one_trained_on_other_data_is_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    settings = load_settings("encoder", data_dir=tiny_data_dir, output_dir=tmp_path)
    splits = load_splits(settings)
    with pytest.raises(ArtifactError, match="fintune train --profile cpu"):
        train_encoder(settings, tmp_path / "student", max_steps=1, splits=splits)
    foreign = tmp_path / "models" / "cpu"
    foreign.mkdir(parents=True)
    card = {"profile": "cpu", "complete": True, "data": {"fingerprint": "0" * 64}}
    (foreign / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ArtifactError, match="trained on data 0000"):
        teacher_targets(foreign, splits, settings)
    short = TeacherTargets(foreign, card, np.full((len(splits.train) - 1, 3), 1 / 3))
    with pytest.raises(ModelError, match="one row of 3 per training sentence"):
        train_encoder(settings, tmp_path / "student", max_steps=1, splits=splits, teacher=short)
    assert not (tmp_path / "student").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_an_encoder_distils_a_trained_qlora_teacher(tiny_settings: Settings, tmp_path: Path) -> None:
    from fintune.model.inference import SentimentClassifier
    from fintune.model.training import train

    splits = load_splits(tiny_settings)
    teacher_dir = train(tiny_settings, max_steps=1, splits=splits).output_dir
    targets = teacher_targets(teacher_dir, splits, tiny_settings)
    expected = SentimentClassifier.from_pretrained(teacher_dir, tiny_settings).predict_proba(
        [ex.text for ex in splits.train]
    )
    assert targets.probabilities.shape == (len(splits.train), 3)
    assert np.allclose(targets.probabilities, expected, atol=1e-6)
    student = load_settings("encoder", data_dir=tiny_settings.data_dir, output_dir=tmp_path / "out")
    _, card = train_encoder(student, tmp_path / "student", max_steps=2, splits=splits, teacher=targets)
    assert card["distillation"]["teacher"] == str(teacher_dir)
    assert card["distillation"]["teacher_version"] == card_version(teacher_dir)  # the teacher's own, as served
    assert card["distillation"]["teacher_profile"] == "tiny-mistral" and card["distillation"]["weight"] == 0.9
    assert card["distillation"]["sentences"] == len(splits.train)
