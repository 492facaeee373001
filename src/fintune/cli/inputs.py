"""Reading texts from files for the commands that take them (``fintune classify --input``, ``fintune guard
--jsonl``): one reader, so every command takes the same files and names a bad line the same way.

``.txt`` is one text per line, ``.csv`` a ``text`` column (optional ``id``), ``.jsonl`` objects with ``text``
(optional ``id``) or bare JSON strings. Files are UTF-8 (a leading byte-order mark, as spreadsheets write, is
dropped). Errors name the file and line, never the line's content, which may hold PII.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fintune.errors import InvalidInputError

_KEY = re.compile(r"[\w ;,.\-]{1,40}")
"""A field name quoted back in an error: short, and no '@' (an e-mail). A CSV without its header row names its
fields after the first row's texts, which may hold PII."""
_MAX_KEY_DIGITS = 4
"""Digits an error may quote across a row's field names: fewer than the six of the shortest number the guard masks
(``guardrails.recognizers.EVIDENCE``; the limit of serving's request ids, kept here so the CLI need not import
Presidio, a five-second import)."""


def read_texts(path: Path, column: str = "text") -> Iterator[tuple[str, str]]:
    """(id, text) pairs from a .txt, .csv or .jsonl file (a pipe, which has no suffix, read as .txt); ids default
    to the 1-based line or row number."""
    _check_file(path)
    suffix = path.suffix.lower()
    if not suffix and not path.is_file():  # /dev/stdin, <(...): a pipe has no name to tell its format by
        suffix = ".txt"
    with io.StringIO(_utf8_text(path), newline="") as handle:
        if suffix == ".txt":
            yield from ((str(n), line.rstrip("\r\n")) for n, line in enumerate(handle, 1) if line.strip())
        elif suffix == ".csv":
            yield from _csv_rows(handle, column, path)
        elif suffix == ".jsonl":
            yield from _jsonl_rows(handle, column, path)
        else:
            raise InvalidInputError(f"{path}: unknown input format {suffix!r}; use .txt, .csv or .jsonl")


def _csv_rows(handle: io.StringIO, column: str, path: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of each CSV row, read strictly: a stray quote, which would swallow every later row into one
    field, is an InvalidInputError naming the line."""
    reader = csv.DictReader(handle, strict=True)
    start = 1  # the line the record being read starts on
    try:
        _ = reader.fieldnames  # the header, read first
        for n in itertools.count(1):
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                return
            yield _row_id(row.get("id"), n), _field(row, column, path, start)
    except csv.Error as exc:
        raise InvalidInputError(f"{path}:{start} is not valid CSV ({exc}); look for an unclosed quote there") from None


def _row_id(value: Any, n: int) -> str:
    """A row's id: its own, else (absent, null or empty) its 1-based number; a lone surrogate (JSON allows
    ``"\\ud800"``), which no UTF-8 output can hold, is written as its escape."""
    text = str(n) if value is None or value == "" else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _utf8_text(path: Path) -> str:
    """The whole file as text (a leading byte-order mark, as spreadsheets write, dropped); InvalidInputError naming
    the first line that is not UTF-8, never its content."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInputError(f"{path}:{line} is not UTF-8 text; save the file as UTF-8") from None


def read_jsonl(path: Path, column: str = "text") -> Iterator[tuple[str, str]]:
    """(id, text) pairs from a JSON-lines file whatever its name ends with (``fintune guard --jsonl``)."""
    _check_file(path)
    with io.StringIO(_utf8_text(path), newline="") as handle:
        yield from _jsonl_rows(handle, column, path)


def _check_file(path: Path) -> None:
    """InvalidInputError unless ``path`` is something to read: a file, or a pipe (``/dev/stdin``, ``<(...)``),
    which ``is_file`` said did not exist."""
    if path.is_dir():
        raise InvalidInputError(f"input {path} is a folder, not a file: name a .txt, .csv or .jsonl file")
    if not path.exists():
        raise InvalidInputError(f"input file {path} does not exist")


def _jsonl_rows(handle: io.StringIO, column: str, path: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of each non-blank line; lines end at \\n, \\r or \\r\\n only (JSON strings may hold U+2028,
    which ``str.splitlines`` would cut a record at)."""
    for n, line in enumerate(handle, 1):
        if line.strip():
            yield _jsonl_row(line, column, path, n)


def _jsonl_row(line: str, column: str, path: Path, n: int) -> tuple[str, str]:
    """(id, text) of one JSONL line: an object with the text key, or a bare JSON string."""
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise InvalidInputError(f"{path}:{n} is not valid JSON ({exc})") from exc
    except RecursionError:
        raise InvalidInputError(f"{path}:{n} is nested too deeply to read as JSON") from None
    if isinstance(value, str):
        return str(n), value
    if not isinstance(value, dict):
        raise InvalidInputError(f"{path}:{n} must be a JSON object with a {column!r} key or a string")
    return _row_id(value.get("id"), n), _field(value, column, path, n)


def _field(row: dict[str, Any], column: str, path: Path, line: int) -> str:
    """The text of a row; InvalidInputError naming its ``path:line`` when it is missing or not a string."""
    if column not in row:
        found = ", ".join(_shown_keys([str(key) for key in row if key])) or "none"
        hint = ", or save the CSV comma-separated" if path.suffix.lower() == ".csv" else ""
        raise InvalidInputError(f"{path}:{line} has no {column!r} field (it has: {found}); name the text's field "
                                f"with --text-column{hint}")
    if not isinstance(row[column], str):
        raise InvalidInputError(f"{path}:{line}: {column!r} holds no text")
    return row[column]


def _shown_keys(keys: list[str]) -> list[str]:
    """A row's field names as an error quotes them, a placeholder for each that could hold PII: a name that is
    not short plain text, or whose digits, with those of the names shown before it, would pass four (a number
    split across a headerless CSV's fields, 536,22,8145, is not shown piece by piece)."""
    shown, digits = [], 0
    for key in keys:
        more = sum(c.isdigit() for c in key)
        if _KEY.fullmatch(key) and digits + more <= _MAX_KEY_DIGITS:
            shown.append(repr(key))
            digits += more
        else:
            shown.append("<a field not shown>")
    return shown
