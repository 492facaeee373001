"""`fintune train`, `fintune lora-report` and `fintune evaluate`: fine-tune, size and judge the model.

Heavy modules (torch, transformers, peft, trl) are imported inside the commands, so `fintune --help` stays fast
and the encoder backend never pulls in the QLoRA stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fintune.cli._app import ModelProfileOption, ProfileOption, app, console, output_file, output_folder
from fintune.config import Settings, load_settings
from fintune.data import check_subset, load_splits
from fintune.errors import ArtifactError
from fintune.model.card import (
    CHECKPOINT_DIR,
    default_model_dir,
    finished_card,
    forget_training,
    is_trained,
    mismatch,
    read_card,
)
from fintune.provenance import command_line


@app.command("train")
def train_command(
    profile: ProfileOption = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Model folder (default: models/<profile> in output_dir, which is "
                     "outputs/ or FINTUNE_OUTPUT_DIR; named <profile>-<subset> for another --subset than the "
                     "profile's)."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(min=1, help="Train exactly this many optimizer steps instead of the profile's epochs (a trial: "
                     "--skip-if-trained does not count it as trained)."),
    ] = None,
    subset: Annotated[str | None, typer.Option(help="Agreement level to train on (default: the profile's).")] = None,
    skip_if_trained: Annotated[
        bool,
        typer.Option(
            "--skip-if-trained", help="Do nothing when the folder already holds this profile trained on this data."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Train from scratch even when the folder already holds a finished model (replaced). "
            "With --skip-if-trained: skip when it holds this profile trained on this data, else replace it."
        ),
    ] = False,
    teacher: Annotated[
        Path | None,
        typer.Option(help="Encoder only: distil from the model in this folder, trained on the same data (default: "
                     "the folder `fintune train` gives the profile's model.encoder.distill_from on "
                     "this subset)."),
    ] = None,
) -> None:
    """Fine-tune the profile's model (QLoRA, or the encoder fallback) and save it with its model card.

    Started again into the same folder, an interrupted QLoRA run resumes; a finished one needs --overwrite.
    The encoder profile learns from the cpu profile's trained model as well as from the labels: train that first.
    """
    settings = load_settings(profile)
    if teacher is not None and settings.model.backend != "encoder":
        raise typer.BadParameter(f"only the encoder backend learns from a teacher, not {settings.profile}'s "
                                 f"{settings.model.backend}", param_hint="--teacher")
    splits = load_splits(settings, None if subset is None else check_subset(subset))
    target = output_folder(output_dir or default_model_dir(settings, splits.subset))
    if skip_if_trained and is_trained(target, settings.profile, splits.fingerprint):
        console.print(f"{target} already holds {settings.profile} trained on {splits.fingerprint[:16]}: skipped")
        return
    wanted = (settings.profile, splits.fingerprint) if skip_if_trained else None
    teacher = teacher or _default_teacher(settings, splits.subset)
    if teacher is not None:  # before anything is replaced: a wrong teacher must not cost the model in the folder
        from fintune.model.distillation import check_teacher

        check_teacher(teacher, splits, settings)
    _clear_finished(target, overwrite, kept_only_if_same=wanted)
    console.print(f"training {settings.profile} ({settings.model.backend}) on {splits.subset}: "
                  f"{len(splits.train)} sentences, fingerprint {splits.fingerprint[:16]}")
    if settings.model.backend == "encoder":
        from fintune.model.distillation import teacher_targets
        from fintune.model.encoder import train_encoder

        targets = teacher_targets(teacher, splits, settings) if teacher is not None else None
        _, card = train_encoder(
            settings, target, max_steps=max_steps, splits=splits, command=command_line(), teacher=targets
        )
    else:
        from fintune.model.training import train

        card = train(settings, target, max_steps=max_steps, splits=splits, command=command_line()).card
    validation = card["validation"]
    console.print(
        f"done in {card['train_seconds']} s, {card['global_steps']} steps; validation accuracy "
        f"{validation['accuracy']:.3f}, macro-F1 {validation['macro_f1']:.3f}; written to {target}/"
    )


def _default_teacher(settings: Settings, subset: str) -> Path | None:
    """The encoder's configured teacher folder on ``subset``; None for labels only or another backend."""
    if settings.model.backend != "encoder":
        return None
    from fintune.model.distillation import teacher_folder

    return teacher_folder(settings, subset)


def _clear_finished(target: Path, overwrite: bool, kept_only_if_same: tuple[str, str] | None) -> None:
    """Refuse to train over a finished model unless told to overwrite it; with --overwrite forget the folder's
    card and checkpoints (an interrupted run's too), so training starts from scratch.

    ``kept_only_if_same``: the (profile, fingerprint) --skip-if-trained asked for, which the folder does not hold.
    """
    card = finished_card(target)
    if card is not None and not overwrite:
        trained = card.get("provenance", {}).get("date", "an earlier run")
        held = f"{target} already holds a finished {card.get('profile')} model (trained {trained})"
        if kept_only_if_same is not None:
            raise ArtifactError(
                f"{held}, not the one --skip-if-trained keeps ({mismatch(card, *kept_only_if_same)}): pass "
                "--overwrite to replace it (`make run TRAIN_FLAGS=--overwrite`), or choose another --output-dir"
            )
        raise ArtifactError(
            f"{held}; pass --overwrite to train it again from scratch, --skip-if-trained to keep it, or choose "
            "another --output-dir"
        )
    if overwrite and (card is not None or (target / CHECKPOINT_DIR).exists()):
        console.print(f"{target}: starting afresh (--overwrite)")
        forget_training(target)


@app.command("calibrate")
def calibrate_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="A folder written by `fintune train`.")],
    profile: ModelProfileOption = None,
) -> None:
    """Fit the model's confidence temperature on the validation split it was trained with; update its card.

    Never changes a label, only the confidence. `fintune train` already calibrates (inference.calibrate).
    """
    from fintune.evaluation import write_json
    from fintune.model.assessment import load_classifier
    from fintune.model.calibration import calibrate, card_temperature
    from fintune.model.card import CARD_FILE

    card = read_card(model)
    settings = load_settings(profile or card.get("profile"))
    splits = load_splits(settings, card.get("data", {}).get("subset"))
    trained_on = card.get("data", {}).get("fingerprint", "")
    if splits.fingerprint != trained_on:
        raise ArtifactError(
            f"{model} was trained on data with fingerprint {trained_on[:16]}, but {splits.subset} here has "
            f"{splits.fingerprint[:16]}: its validation split is not here; calibrate it where it was trained"
        )
    try:
        card_temperature(card)
        start = None  # the card's own
    except ArtifactError:  # refit from 1.0: loading with the recorded one (0, NaN) would refuse the model; the
        start = 1.0  # card is rewritten only once the fit succeeds
    classifier = load_classifier(model, settings, temperature=start)
    qlora = card.get("backend", "qlora") == "qlora"
    # the sentences `fintune train` calibrated on: the QLoRA trainer honours the validation_limit it trained with
    trained_limit = card.get("model_settings", {}).get("training", {}).get("validation_limit")
    examples = splits.validation_head(trained_limit if qlora else None)
    source = f"validation of {splits.subset} ({len(examples)} sentences)"
    _, record = calibrate(classifier, examples, settings.model.inference.calibration_bins, source)
    updated = {**card, "calibration": {**record, "command": command_line()}}
    write_json(model / CARD_FILE, updated)
    if qlora:  # its README.md quotes the card: keep them in step
        from fintune.model.training import model_card

        (model / "README.md").write_text(model_card(updated), encoding="utf-8")
    console.print(
        f"temperature {record['temperature']:.3f}: validation ECE {record['ece_before']} -> {record['ece_after']}, "
        f"NLL {record['nll_before']} -> {record['nll_after']}; written to {model / CARD_FILE}"
    )


@app.command("lora-report")
def lora_report_command(
    profile: ProfileOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the report, with its provenance, to this file.")
    ] = None,
) -> None:
    """Print the profile's exact LoRA parameter counts and bf16 vs NF4 weight bytes as JSON (no weights needed)."""
    from fintune.evaluation import write_json
    from fintune.model.lora import lora_report
    from fintune.provenance import provenance

    settings = load_settings(profile)
    if output is not None:
        output_file(output)
    report = lora_report(settings)
    typer.echo(json.dumps(report, indent=2))
    if output is not None:
        write_json(output, {"provenance": provenance(command_line()), **report})


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="A folder written by `fintune train`.")],
    subset: Annotated[
        str | None,
        typer.Option(help="Agreement level whose test split is scored (default: the one the model trained on)."),
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Where to write (default: <model>/eval/<subset>/).")
    ] = None,
    profile: ModelProfileOption = None,
) -> None:
    """Score a trained model on a test split; write metrics.json and comparison.json against the baselines."""
    from fintune.model.assessment import evaluate

    if subset is not None:  # '' too (an unset shell variable): refused, not read as the default
        check_subset(subset)
    card = read_card(model)
    settings = load_settings(profile or card.get("profile"))
    name = check_subset(subset if subset is not None else card.get("data", {}).get("subset") or settings.data.subset)
    target = output_folder(output_dir or model / "eval" / name)
    result = evaluate(model, settings, name, target, command=command_line())
    metrics, comparison = result["metrics"], result["comparison"]
    console.print(
        f"{name} test ({metrics['sentences']} sentences): accuracy {metrics['accuracy']:.3f}, macro-F1 "
        f"{metrics['macro_f1']:.3f}, ECE {metrics['expected_calibration_error']:.3f}, "
        f"p50 {metrics['latency_p50_ms']:.1f} ms, {metrics['batch_ms_per_sentence']:.1f} ms/sentence batched"
    )
    console.print(comparison["verdict"], highlight=False)
    console.print(f"written to {target}/ (metrics.json, comparison.json, model_confusion.png, "
                  "model_reliability.png, comparison.png)")
