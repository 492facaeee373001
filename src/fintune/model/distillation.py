"""Teacher probabilities for the encoder: a trained model's scores on the training split (knowledge distillation).

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015): a small student learns more
from a stronger teacher's whole probability vector (how neutral a "slightly positive" sentence looks) than from
the hard label alone. This module owns finding the teacher, checking it learnt from the very same training split,
and scoring that split; the encoder's loop (:mod:`fintune.model.encoder`) only receives the numbers.

Scoring a QLoRA teacher loads its stack (bitsandbytes, peft) in this process; training on labels only
(``model.encoder.distill_from: null``) never does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fintune import LABELS
from fintune.config import Settings, load_settings
from fintune.data import DataSplits
from fintune.errors import ArtifactError
from fintune.model.assessment import load_classifier
from fintune.model.card import default_model_dir, finished_card, version_of

SCORING_CHUNK = 256  # sentences per progress-bar step


@dataclass(frozen=True)
class TeacherTargets:
    """A teacher's label probabilities for every training sentence, in the training split's order."""

    folder: Path
    card: dict[str, Any]
    probabilities: np.ndarray  # (len(splits.train), 3), in fintune.LABELS order
    seconds: float = 0.0  # wall time of the scoring (not part of the student's train_seconds)

    def describe(self) -> dict[str, Any]:
        """What the student's card records about its teacher."""
        return {
            "teacher": str(self.folder),  # where it was on the training machine
            "teacher_version": version_of(self.card),  # which model it was, wherever it is now
            "teacher_profile": self.card.get("profile"),
            "teacher_backend": self.card.get("backend", "qlora"),
            "teacher_validation": self.card.get("validation"),
            "sentences": len(self.probabilities),
            "scoring_seconds": round(self.seconds, 1),
        }


def teacher_folder(settings: Settings, subset: str | None = None) -> Path | None:
    """Where the configured teacher trained on ``subset`` lives by default (``<output_dir>/models/<distill_from>``,
    ``-<subset>`` for another subset than the profile's, as `fintune train` names it), or None for labels only."""
    profile = settings.model.encoder.distill_from
    return default_model_dir(settings, subset, profile) if profile else None


def teacher_targets(folder: Path, splits: DataSplits, settings: Settings) -> TeacherTargets:
    """Score ``splits.train`` with the finished model in ``folder``, which must have trained on the same split
    (loaded with its own profile's model settings and this run's paths)."""
    card = check_teacher(folder, splits, settings)
    own_model = load_settings(card.get("profile")).model
    started = time.perf_counter()
    classifier = load_classifier(folder, settings.model_copy(update={"model": own_model}))
    texts = [example.text for example in splits.train]
    chunks = [texts[start : start + SCORING_CHUNK] for start in range(0, len(texts), SCORING_CHUNK)]
    scored = [classifier.predict_proba(chunk) for chunk in tqdm(chunks, desc=f"teacher {folder.name} scoring")]
    probabilities = np.concatenate(scored) if scored else np.zeros((0, len(LABELS)))
    return TeacherTargets(folder, card, probabilities, time.perf_counter() - started)


def check_teacher(folder: Path, splits: DataSplits, settings: Settings) -> dict[str, Any]:
    """The card of the finished model in ``folder``; ArtifactError when there is none, or when it trained on
    other data than ``splits`` (cheap: `fintune train` checks it before it replaces anything)."""
    card = finished_card(folder)
    if card is None:
        profile = settings.model.encoder.distill_from or "P"
        raise ArtifactError(
            f"the encoder learns from the model in {folder}, which holds none: train it first (`fintune train "
            f"--profile {profile} --subset {splits.subset} --output-dir {folder}`), pass --teacher DIR, or "
            "train on labels only with FINTUNE_MODEL__ENCODER__DISTILL_FROM=null"
        )
    trained_on = card.get("data", {}).get("fingerprint")
    if trained_on != splits.fingerprint:
        # a teacher that trained on another subset may have seen this split's test sentences and would leak them
        raise ArtifactError(
            f"the teacher in {folder} was trained on data {str(trained_on)[:16]} "
            f"({card.get('data', {}).get('subset', 'subset unknown')}), the encoder trains on {splits.subset} "
            f"({splits.fingerprint[:16]}): train a teacher on {splits.subset} (`fintune train --profile "
            f"{card.get('profile')} --subset {splits.subset} --output-dir DIR`) and pass `--teacher DIR`"
        )
    return card
