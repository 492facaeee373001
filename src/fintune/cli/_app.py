"""The shared typer application and consoles every commands module registers on."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from fintune.errors import ArtifactError

app = typer.Typer(
    name="fintune",
    help="FinTune: financial sentiment (negative / neutral / positive) built to survive production.\n\n"
    "Every command reads a profile (configs/<name>.yaml, default 'cpu'; FINTUNE_CONFIG_DIR names another folder); "
    "FINTUNE_* environment variables override it (FINTUNE_DATA_DIR, FINTUNE_MONITORING__DRIFT_THRESHOLD, ...).\n\n"
    "Example: fintune train --profile cpu && fintune evaluate --model outputs/models/cpu\n\n"
    "Exit codes: 0 done; 1 a run that finished but left texts unanswered by a system failure (classify); "
    "2 an error FinTune explains in one 'error:' line: bad input, settings or paths (checked before any slow "
    "work where they can be), or a model, Ray cluster or recovery that failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (make run, CI logs) gets 120 columns instead of rich's 80, so tables are not truncated. No markup
# nor emoji codes: what is printed holds paths and values as given, and "[/a]" or ":cat:" in one was read as a
# style tag (a MarkupError traceback, or a path shown without its "[final]") or turned into an emoji.
console = Console(width=None if sys.stdout.isatty() else 120, markup=False, emoji=False)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120, markup=False, emoji=False)


def labelled(label: str, style: str, message: str) -> Text:
    """``label`` in ``style`` ("error:" in bold red), then ``message`` exactly as given."""
    return Text.assemble((label, style), " ", message)

ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", help="Profile name in configs/ or path to a .yaml file (default: FINTUNE_PROFILE or 'cpu')."
    ),
]
"""The ``--profile`` option every command that reads settings takes."""

ServedProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", help="Profile name in configs/ or path to a .yaml file (default: FINTUNE_PROFILE, else with "
        "--model the profile the model was trained with, named in its fintune.json, else 'cpu').",
    ),
]
"""``--profile`` of the commands that serve a model (serve, classify)."""

ModelProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", help="Profile whose settings load and score the model: a name in configs/ or a .yaml path "
        "(default: the profile the model was trained with, named in its fintune.json).",
    ),
]
"""The ``--profile`` option of commands that work on a trained model folder."""


def output_folder(path: Path, option: str = "--output-dir") -> Path:
    """``path`` as a folder to write into; ArtifactError before any work when it, or a folder above it, is a file."""
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} is a file, not a folder: choose another {option}")
    _check_parents(path, option)
    return path


def output_file(path: Path, option: str = "--output") -> Path:
    """``path`` as a file to write, its folder made; ArtifactError before any work when it is a folder, a folder
    above it a file, or its folder cannot be made or written (no permission)."""
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not a file: name a file with {option}")
    _check_parents(path, option)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot make the folder {path.parent} for {path} ({exc.strerror or exc}): choose "
                            f"another {option}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {path}: {path.parent} is not writable; choose another {option}")
    return path


def _check_parents(path: Path, option: str) -> None:
    """ArtifactError when a path above ``path`` exists as a file (no folder can be made under it)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ArtifactError(f"{parent} is a file, so {path} cannot be written: choose another {option}")
            return
