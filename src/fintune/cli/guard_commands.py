"""`fintune guard` and `fintune guard-eval`: mask PII in text from the command line, and measure the guard.

Presidio (and with it spaCy, transformers and torch: seconds to import) is imported inside the commands, so
`fintune --help` and every other command do not pay for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from fintune.cli._app import ProfileOption, app, console, err_console, labelled, output_file
from fintune.cli.inputs import read_jsonl
from fintune.config import Settings, load_settings
from fintune.data import check_subset, find_source, load_examples
from fintune.errors import DataNotFoundError, GuardrailError
from fintune.provenance import command_line, provenance

if TYPE_CHECKING:
    from fintune.guardrails import PIIGuard

GUARD_PACKAGES = ("fintune", "presidio-analyzer", "presidio-anonymizer", "spacy", "phonenumbers", "tldextract")


def _guard(settings: Settings) -> PIIGuard:
    """The process's guard, with log redaction installed when the profile asks for it."""
    from fintune.guardrails import PIIGuard, install_log_redaction

    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)  # one INFO line per recognizer otherwise
    guard = PIIGuard.from_settings(settings.guardrails)
    if settings.guardrails.redact_logs:
        install_log_redaction(guard)
    return guard


@app.command("guard")
def guard_command(
    text: Annotated[str | None, typer.Argument(help="Text to guard; omit it when using --jsonl.")] = None,
    jsonl: Annotated[
        Path | None, typer.Option("--jsonl", help="UTF-8 file with one JSON object per line holding the text under "
                     "'text' (or --text-column), or one JSON string per line.")
    ] = None,
    text_column: Annotated[str, typer.Option(help="Key holding the text in --jsonl objects.")] = "text",
    profile: ProfileOption = None,
) -> None:
    """Mask PII and print one GuardrailResult as JSON per input. With --jsonl: one line per non-blank input line,
    in order, each with the input's "id" (its line number when it has none), as classify writes them."""
    if (text is None) == (jsonl is None):
        raise GuardrailError("give either TEXT or --jsonl FILE (exactly one of them)")
    # a bad file fails before the slow guard load, read as `fintune classify --input` reads a .jsonl
    rows = None if jsonl is None else list(read_jsonl(jsonl, text_column))
    if rows == []:
        raise GuardrailError(f"{jsonl} holds no text to guard")
    guard = _guard(load_settings(profile))
    if rows is None:
        typer.echo(guard.redact(str(text)).to_json())
        return
    # with its id: blank lines are skipped, so without one a result could not be matched to its line
    for (row_id, _), result in zip(rows, guard.redact_batch([row_text for _, row_text in rows]), strict=True):
        typer.echo(json.dumps({"id": row_id, **result.model_dump()}, ensure_ascii=False))


@app.command("guard-eval")
def guard_eval_command(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Result file (default: <output_dir>/guardrails/guard_eval.json; "
                     "output_dir: outputs/ or FINTUNE_OUTPUT_DIR)."),
    ] = None,
    subset: Annotated[
        str | None,
        typer.Option(help="PhraseBank subset whose clean sentences must stay unaltered (default: the profile's)."),
    ] = None,
    compare_defaults: Annotated[
        bool,
        typer.Option(
            "--compare-defaults", help="Also measure Presidio's own defaults (full spaCy NER) as the baseline (slow)."
        ),
    ] = False,
    profile: ProfileOption = None,
) -> None:
    """Recall and leak rate on synthetic PII (dev and held-out eval templates), clean sentences altered, latency."""
    from fintune.evaluation import write_json  # deferred, as the guard is: matplotlib and scikit-learn
    from fintune.guardrails import evaluation as guard_eval

    settings = load_settings(profile)
    # a typo is a usage error, not a report without its clean-sentence figures (and no folder made for it)
    named = subset is not None
    subset = check_subset(settings.data.subset if subset is None else subset)
    target = output_file(output or settings.output_dir / "guardrails" / "guard_eval.json")
    config = settings.guardrails
    clean = _clean_sentences(settings, subset, required=named)  # before the slow guard load
    guard = _guard(settings)
    report: dict[str, Any] = {
        "provenance": provenance(command_line(), GUARD_PACKAGES),
        "timing_environment": _timing_environment(),
        "settings": config.model_dump(),
    }
    for split in ("dev", "eval"):
        cases = guard_eval.build_cases(split, config.eval_samples_per_template, config.eval_seed)
        report[f"synthetic_{split}"] = guard_eval.score_cases(guard, cases)
    report["data"] = clean["data"]
    texts = clean["texts"] or [c.text for c in guard_eval.build_cases("eval", 1, config.eval_seed)]
    if clean["texts"]:
        report["clean_phrasebank"] = guard_eval.clean_alterations(guard, clean["texts"])
    report["latency"] = {"texts": "phrasebank" if clean["texts"] else "synthetic_eval",
                         **guard_eval.latency(guard, texts, config.eval_latency_samples)}
    report["targets"] = _targets(report)
    if compare_defaults:
        report["presidio_defaults"] = _presidio_defaults(settings, clean["texts"], texts)
    write_json(target, report)
    console.print(_summary_table(report))
    console.print(f"written to {target}")


def _clean_sentences(settings: Settings, subset: str, required: bool) -> dict[str, Any]:
    """PhraseBank sentences (at most ``eval_clean_sentences``, 0 = all) and their fingerprint, or why none.

    Data that is not there is skipped, with a warning (the synthetic figures need none), unless ``required`` (a
    ``--subset`` named); a data file that is there but malformed is always an error: skipping it silently judged
    the latency targets on other texts."""
    try:
        examples = load_examples(settings, subset)
        source = find_source(settings, subset)
    except DataNotFoundError as exc:
        if required:
            raise
        err_console.print(labelled("warning:", "yellow", f"no clean PhraseBank sentences, so no 'altered' figure "
                                   f"and latency on synthetic texts: {exc}"), highlight=False, soft_wrap=True)
        return {"texts": [], "data": {"skipped": f"Financial PhraseBank not available: {exc}"}}
    limit = settings.guardrails.eval_clean_sentences or len(examples)
    texts = [example.text for example in examples[:limit]]
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return {"texts": texts, "data": {"subset": source.subset, "source_sha256": source.sha256,
                                     "sentences_sha256": digest, "sentences": len(texts)}}


def _presidio_defaults(settings: Settings, clean_texts: list[str], latency_texts: list[str]) -> dict[str, Any]:
    """The same figures for Presidio's defaults: PII-only entity set, and every default entity (clean text only)."""
    from fintune.guardrails import evaluation as guard_eval

    config = settings.guardrails
    pii_only = guard_eval.presidio_defaults_guard(config, pii_only=True)
    cases = guard_eval.build_cases("eval", config.eval_samples_per_template, config.eval_seed)
    baseline: dict[str, Any] = {"pii_only": {
        "entities": pii_only.settings.entities,
        "synthetic_eval": guard_eval.score_cases(pii_only, cases),
        "latency": guard_eval.latency(pii_only, latency_texts, config.eval_latency_samples),
    }}
    if clean_texts:
        baseline["pii_only"]["clean_phrasebank"] = _without_indices(guard_eval.clean_alterations(pii_only, clean_texts))
        every = guard_eval.presidio_defaults_guard(config, pii_only=False)
        baseline["all_entities"] = {
            "entities": every.settings.entities,
            "clean_phrasebank": _without_indices(guard_eval.clean_alterations(every, clean_texts)),
        }
    return baseline


def _without_indices(report: dict[str, Any]) -> dict[str, Any]:
    """A clean-alteration report without its (long) list of altered sentence indices."""
    return {key: value for key, value in report.items() if key != "altered_indices"}


def _timing_environment() -> dict[str, Any]:
    """What bounds the latency figures: cores this process may run on and the thread-count variables."""
    return {
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    }


def _targets(report: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's targets, checked against the measured figures (None where a figure is missing)."""
    held_out, latency = report["synthetic_eval"], report["latency"]
    clean = report.get("clean_phrasebank")
    return {
        "eval_leak_rate_is_0": held_out["leak_rate"] == 0,
        "eval_recall_at_least_99.5%_per_type": held_out["min_recall"] >= 0.995,
        "clean_altered_at_most_0.5%": None if clean is None else clean["altered_fraction"] <= 0.005,
        "p50_at_most_10ms": latency["p50_ms"] <= 10,
        "p99_at_most_30ms": latency["p99_ms"] <= 30,
        "batch_faster_per_sentence": latency["batch_mean_ms"] < latency["mean_ms"],
    }


def _summary_table(report: dict[str, Any]) -> Table:
    """Recall and leak rate per entity type on both template splits."""
    table = Table(title="guard-eval: synthetic PII (recall / leak rate)")
    for column in ("entity", "dev recall", "dev leaks", "eval recall", "eval leaks"):
        table.add_column(column, justify="left" if column == "entity" else "right")
    dev, held_out = report["synthetic_dev"]["per_entity"], report["synthetic_eval"]["per_entity"]
    for entity, row in held_out.items():
        table.add_row(entity, f"{dev[entity]['recall']:.4f}", f"{dev[entity]['leak_rate']:.4f}",
                      f"{row['recall']:.4f}", f"{row['leak_rate']:.4f}")
    clean, latency = report.get("clean_phrasebank"), report["latency"]
    caption = f"p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms, batch {latency['batch_mean_ms']} ms/sentence"
    if clean:
        caption += f"; clean sentences altered {clean['altered']}/{clean['sentences']}"
    table.caption = caption
    return table
