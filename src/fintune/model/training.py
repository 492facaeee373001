"""QLoRA fine-tuning: NF4 base + LoRA adapter trained by TRL's SFTTrainer on prompt/completion records.

Each training sentence becomes ``{"prompt": <template with the sentence>, "completion": " <label>"}``; TRL
masks the prompt so the loss is on the completion only. Training is seeded, shows progress bars, writes
resumable checkpoints under ``<out>/checkpoints`` (a re-run resumes from the last one), and leaves in ``<out>``:
the PEFT adapter and tokenizer, ``README.md`` (model card), ``fintune.json`` (the same as data),
``loss_curve.png``, ``validation_report.json`` and ``drift_baseline.json``. The card also holds the confidence
temperature fitted on the validation split (:mod:`fintune.model.calibration`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trl.trainer.utils as trl_utils
from datasets import Dataset
from peft import prepare_model_for_kbit_training, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerState, set_seed
from trl import SFTConfig, SFTTrainer

from fintune.config import Settings, TrainingSettings
from fintune.data import DataSplits, Example, load_splits
from fintune.errors import ArtifactError
from fintune.evaluation import write_json
from fintune.model.calibration import score_validation
from fintune.model.card import CARD_FILE, CHECKPOINT_DIR, default_model_dir
from fintune.model.inference import SentimentClassifier
from fintune.model.loading import load_tokenizer, resolve_base
from fintune.model.lora import check_targets, count_parameters, lora_config
from fintune.model.plots import plot_loss_curve
from fintune.model.precision import resolve_dtype
from fintune.model.quantization import load_base
from fintune.provenance import provenance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced and measured."""

    output_dir: Path
    card: dict[str, Any]
    classifier: SentimentClassifier


def records(examples: list[Example], template: str) -> Dataset:
    """Prompt/completion records of the sentences (the completion is a space and the label)."""
    return Dataset.from_list(
        [{"prompt": template.format(text=ex.text), "completion": f" {ex.label}"} for ex in examples]
    )


def autocast_bf16(training: TrainingSettings, compute_dtype: torch.dtype) -> bool:
    """Whether to train under bf16 autocast: ``training.bf16``, where ``auto`` follows the compute dtype."""
    return compute_dtype == torch.bfloat16 if training.bf16 == "auto" else training.bf16


def sft_config(
    training: TrainingSettings, out: Path, seed: int, max_steps: int | None, compute_dtype: torch.dtype
) -> SFTConfig:
    """TRL's configuration from the profile: completion-only loss, length grouping, checkpoints, no reporting."""
    steps = training.max_steps if max_steps is None else max_steps
    return SFTConfig(
        output_dir=str(out / CHECKPOINT_DIR),
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,
        weight_decay=training.weight_decay,
        num_train_epochs=training.epochs,
        max_steps=steps,
        max_length=training.max_length,
        completion_only_loss=True,
        bf16=autocast_bf16(training, compute_dtype),
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        activation_checkpointing=training.gradient_checkpointing,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


@contextmanager
def loss_on_completion_positions_only() -> Iterator[bool]:
    """Within the block, TRL's fused LM head scores only the positions that carry a label on the CPU too.

    TRL projects only the labelled positions through the output head where Triton runs (CUDA, XPU), but every
    position elsewhere, so that compilers see one tile shape per batch. On an eager CPU that is ~20x the head's
    work the loss needs (a one-token completion after a ~40-token prompt), and it halved the cpu profile's
    step time. Masked positions add zero to the loss either way, so loss and gradients are the same. Yields
    whether TRL had the switch to turn (False: this TRL decides otherwise, and nothing was changed).
    """
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        logger.info("this TRL has no _use_triton switch: its fused head decides which positions it scores")
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = original


def train(
    settings: Settings,
    output_dir: Path | None = None,
    max_steps: int | None = None,
    splits: DataSplits | None = None,
    command: str | None = None,
) -> TrainingResult:
    """Fine-tune the profile's base with QLoRA and save adapter, model card, loss curve and drift baseline."""
    splits = splits or load_splits(settings, settings.data.subset)
    out = Path(output_dir or default_model_dir(settings, splits.subset))
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = settings.model
    compute_dtype = resolve_dtype(model_cfg.quantization.compute_dtype)
    resume = resume_or_record_run(out, run_identity(settings, splits, max_steps))
    set_seed(settings.seed)
    started = time.perf_counter()
    source = resolve_base(model_cfg, settings.cache_dir)
    tokenizer = load_tokenizer(source)
    model = load_base(source, model_cfg)
    check_targets(model, model_cfg.lora)
    if model_cfg.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.training.gradient_checkpointing
        )
    trainer = SFTTrainer(
        model=model,
        args=sft_config(model_cfg.training, out, settings.seed, max_steps, compute_dtype),
        train_dataset=records(splits.train, model_cfg.training.prompt_template),
        processing_class=tokenizer,
        peft_config=lora_config(model_cfg.lora),
    )
    checkpoint = last_checkpoint(out) if resume else None
    resumed_from = checkpoint_step(checkpoint)
    session_loss = 0.0
    if checkpoint and resumed_from >= planned_steps(trainer):
        logger.info("%s already holds the run's last step: nothing left to train", checkpoint)
        restore_finished_run(trainer, checkpoint)
    else:
        if checkpoint:
            logger.info("resuming from %s", checkpoint)
        with loss_on_completion_positions_only():
            session_loss = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).training_loss
    train_seconds = time.perf_counter() - started
    # without accelerate's bf16-autocast wrapper: the saved adapter is then scored exactly as it is reloaded
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    peft_model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    plot_loss_curve(trainer.state.log_history, out / "loss_curve.png", title=f"{settings.profile}: training loss")
    classifier = SentimentClassifier(peft_model, tokenizer, model_cfg.training.prompt_template,
                                     model_cfg.inference)
    validation, calibration = score_validation(
        classifier, splits.validation_head(model_cfg.training.validation_limit), splits.subset, model_cfg.inference,
        out,
    )
    trainable, total = count_parameters(peft_model)
    card = {
        "provenance": provenance(command or f"fintune train --profile {settings.profile}"),
        "backend": "qlora",
        "profile": settings.profile,
        "base_model": model_cfg.base_model,
        "base_source": source,
        "model_settings": model_cfg.model_dump(mode="json"),
        "seed": settings.seed,
        "data": splits.describe(),
        "trainable_params": trainable,
        "total_params": total,
        "memory_footprint_bytes": int(peft_model.get_memory_footprint()),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),  # what quantization.compute_dtype resolved to
        "bf16_autocast": autocast_bf16(model_cfg.training, compute_dtype),
        "max_steps": max_steps,  # --max-steps, None when the profile decided where training ends
        "global_steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "train_loss": round(run_mean_loss(trainer.state.log_history, session_loss, resumed_from,
                                          trainer.state.global_step), 4),
        "train_seconds": round(train_seconds, 1),  # this session's: a resumed run's earlier ones are not known
        "resumed": resume,
        "resumed_from_step": resumed_from if checkpoint else None,
        "validation": validation,
        "calibration": calibration,
        "complete": True,
    }
    write_json(out / CARD_FILE, card)
    (out / "README.md").write_text(model_card(card), encoding="utf-8")
    return TrainingResult(out, card, classifier)


RUN_FILE = "run.json"
"""In the checkpoint folder: what the run is (profile, seed, data fingerprint, model settings)."""


def run_identity(settings: Settings, splits: DataSplits, max_steps: int | None = None) -> dict[str, Any]:
    """What must be the same for checkpoints to be resumed: profile, seed, data, the step the run ends at
    (``max_steps``, else the profile's; the learning-rate schedule follows it) and every model setting that shapes
    training (inference settings may change between the two runs)."""
    return {"profile": settings.profile, "seed": settings.seed, "data_fingerprint": splits.fingerprint,
            "max_steps": settings.model.training.max_steps if max_steps is None else max_steps,
            "model_settings": settings.model.model_dump(mode="json", exclude={"inference"})}


def resume_or_record_run(out: Path, identity: dict[str, Any]) -> bool:
    """True when ``out`` holds checkpoints of this very run; without checkpoints, record the run and return False.

    Checkpoints of another run (other data, profile, settings or last step) are an :class:`ArtifactError`: resuming them
    would mix two trainings silently, or fail deep inside the trainer.
    """
    recorded = out / CHECKPOINT_DIR / RUN_FILE
    if last_checkpoint(out) is None:
        recorded.parent.mkdir(parents=True, exist_ok=True)
        write_json(recorded, identity)
        return False
    previous = json.loads(recorded.read_text(encoding="utf-8")) if recorded.is_file() else None
    if previous != json.loads(json.dumps(identity)):
        raise ArtifactError(
            f"{out} holds checkpoints of another run (other data, profile, settings or --max-steps, or an older "
            "version): pass --overwrite to start afresh, or choose another --output-dir"
        )
    return True


TRAINER_STATE = "trainer_state.json"


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder of a run, if any. transformers writes ``trainer_state.json``
    last: a folder without it is a save the run was killed in, skipped (resuming from it was a traceback)."""
    folders = [p for p in (out / CHECKPOINT_DIR).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in folders if (p / TRAINER_STATE).is_file()]
    for folder in sorted(set(folders) - set(complete), key=checkpoint_step):
        logger.warning("checkpoint %s is incomplete (no %s: the run stopped while saving it); not resumed from",
                       folder, TRAINER_STATE)
    return max(complete, key=checkpoint_step, default=None)


def planned_steps(trainer: SFTTrainer) -> int:
    """The optimizer step the run ends at: ``max_steps`` when set, else the epochs' worth of steps, counted
    as transformers counts them (a last partial accumulation is a step)."""
    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def restore_finished_run(trainer: SFTTrainer, checkpoint: Path) -> None:
    """Load the adapter and trainer state of a checkpoint that already holds the run's last step.

    ``trainer.train(resume_from_checkpoint=...)`` would train one more step first (transformers checks the step
    limit only after a step), so a run killed between its last checkpoint and its adapter would come back one
    step past the plan. Restoring instead leaves exactly the weights that checkpoint saved.
    """
    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def checkpoint_step(checkpoint: Path | None) -> int:
    """The global step a ``checkpoint-N`` folder was saved at (0 for none)."""
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def run_mean_loss(log_history: list[dict[str, Any]], session_loss: float, resumed_from: int, global_step: int) -> float:
    """Mean training loss over every step of the run.

    transformers' ``training_loss`` covers only the steps of the last ``train()`` call; a resumed run adds the
    losses logged before ``resumed_from`` (each the mean of its logging interval) weighted by their steps.
    """
    earlier, covered = 0.0, 0
    for entry in log_history:
        if "loss" in entry and covered < entry["step"] <= resumed_from:
            earlier += float(entry["loss"]) * (entry["step"] - covered)
            covered = entry["step"]
    session_steps = global_step - resumed_from
    return (earlier + float(session_loss) * session_steps) / max(covered + session_steps, 1)


def model_card(card: dict[str, Any]) -> str:
    """The adapter's README.md: what it is, what it was trained on, how well it did."""
    validation = card["validation"]
    data = card["data"]
    return "\n".join(
        [
            "---",
            f"base_model: {card['base_model']}",
            "library_name: peft",
            "tags: [fintune, qlora, financial-sentiment]",
            "---",
            f"# FinTune adapter ({card['profile']} profile)",
            "",
            "LoRA adapter for financial sentiment (negative / neutral / positive), trained with QLoRA "
            "(4-bit NF4 base + LoRA, TRL SFTTrainer, loss on the completion only).",
            "",
            "| | |",
            "| --- | --- |",
            f"| base model | `{card['base_model']}` |",
            f"| profile | `{card['profile']}` |",
            f"| data | Financial PhraseBank `{data['subset']}`, fingerprint `{data['fingerprint']}` |",
            f"| trainable parameters | {card['trainable_params']:,} of {card['total_params']:,} |",
            f"| memory footprint | {card['memory_footprint_bytes'] / 2**20:.1f} MiB |",
            f"| steps / epochs | {card['global_steps']} / {card['epochs']} |",
            f"| training loss | {card['train_loss']} |",
            f"| wall time | {card['train_seconds']} s{_session_note(card)} |",
            f"| validation ({validation['sentences']} sentences) | accuracy {validation['accuracy']}, "
            f"macro-F1 {validation['macro_f1']} |",
            *_calibration_row(card.get("calibration")),
            "",
            "Load it with `fintune.model.inference.SentimentClassifier.from_pretrained(<this folder>, settings)`.",
            "",
        ]
    )


def _session_note(card: dict[str, Any]) -> str:
    """What the wall time covers when the run was resumed: only the last session, which read as the whole run."""
    step = card.get("resumed_from_step")
    return f" (this session only: resumed from step {step})" if step is not None else ""


def _calibration_row(calibration: dict[str, Any] | None) -> list[str]:
    """The model card's calibration row, when a temperature was fitted."""
    if not calibration:
        return []
    return [f"| confidence calibration | temperature {calibration['temperature']:.3f}, validation ECE "
            f"{calibration['ece_before']} -> {calibration['ece_after']} |"]
