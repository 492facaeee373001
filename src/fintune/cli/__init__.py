"""The `fintune` command line (typer): one sub-module of commands per concern, one error line, never a traceback.

Each ``*_commands`` module defines its commands on the shared :data:`app` and is imported here so that
registering a command is one import line. :func:`main` is the console-script entry point.
"""

from __future__ import annotations

import logging
import sys

from fintune.cli._app import app, err_console, labelled
from fintune.errors import FinTuneError

# Importing a commands module registers its commands on `app`.
from fintune.cli import config_commands, data_commands  # noqa: E402,F401  isort: skip
from fintune.cli import serve_commands  # noqa: E402,F401  isort: skip
from fintune.cli import guard_commands  # noqa: E402,F401  isort: skip
from fintune.cli import model_commands  # noqa: E402,F401  isort: skip

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a :class:`FinTuneError` becomes one red line on stderr and its exit code.

    Usage errors (unknown option, missing or invalid value), ``--help`` and Ctrl-C are typer's own business
    (standalone mode): recent typer releases carry their own copy of click, whose exceptions are not click's.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)  # at INFO it lists each recognizer twice
    try:
        app(args=argv, prog_name="fintune", standalone_mode=True)
    except FinTuneError as exc:
        err_console.print(labelled("error:", "bold red", str(exc)), highlight=False, soft_wrap=True)
        return _exit(exc.exit_code, argv)
    except SystemExit as exc:  # standalone mode always ends here: 0 after a command, 2 after a usage error
        return _exit(_exit_code(exc.code), argv)
    return _exit(0, argv)


def _exit_code(code: object) -> int:
    """The status a ``SystemExit`` carries: None is success, a message (not a number) failure."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _exit(code: int, argv: list[str] | None) -> int:
    """Exit the process when run as a console script; return the code when called from Python (tests)."""
    if argv is None:
        sys.exit(code)
    return code

