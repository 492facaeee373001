"""The shared typer application and consoles every commands module registers on."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="fintune",
    help="FinTune: financial sentiment (negative / neutral / positive) built to survive production.\n\n"
    "Every command reads a profile (configs/<name>.yaml, default 'cpu'); FINTUNE_* environment variables "
    "override it (FINTUNE_DATA_DIR, FINTUNE_MONITORING__DRIFT_THRESHOLD, ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (make run, CI logs) gets 120 columns instead of rich's 80, so tables are not truncated.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", help="Profile name in configs/ or path to a .yaml file (default: FINTUNE_PROFILE or 'cpu')."
    ),
]
"""The ``--profile`` option every command that reads settings takes."""

ModelProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", help="Profile whose settings load and score the model: a name in configs/ or a .yaml path "
        "(default: the profile the model was trained with, named in its fintune.json).",
    ),
]
"""The ``--profile`` option of commands that work on a trained model folder."""
