"""Where a number came from: the command, machine, date and library versions recorded beside every result."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import urllib.parse
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_PACKAGES = ("fintune", "numpy", "scikit-learn", "torch", "transformers", "peft", "trl", "bitsandbytes")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")
"""Environment variables that change how many threads the numbers were measured with."""
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET", "WEBHOOK")
"""A ``FINTUNE_*`` variable whose name holds one of these has its value masked in the record."""
MASK = "****"


def machine() -> dict[str, Any]:
    """CPU model, core count, memory, OS and Python of this machine."""
    return {
        "cpu": _cpu_model(),
        "cpu_features": _cpu_features(),
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (absent ones are left out)."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def provenance(command: str, packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """The record every result file carries: command, UTC date, code revision, machine, library versions, and
    the ``FINTUNE_*`` and thread environment variables that were set."""
    return {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": revision(),
        "machine": machine(),
        "versions": versions(packages),
        "environment": fintune_environment(),
        "thread_variables": thread_variables(),
    }


def command_line(keep_path: bool = False) -> str:
    """The command line of this process, as typed (``fintune baselines --subset 50agree``); with ``keep_path``,
    a script run by the interpreter, its path as typed (``python benchmarks/serving_load.py --seconds 5``)."""
    if keep_path and sys.argv:
        return " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    program = os.path.basename(sys.argv[0]) if sys.argv else "python"
    return " ".join([program, *sys.argv[1:]])


def revision(folder: Path | None = None) -> dict[str, Any] | None:
    """The git commit of ``folder`` (default: this package's source) and whether tracked files differ from it;
    None where git is missing or the folder is in no repository."""
    where = folder or Path(__file__).resolve().parent
    commit = _git(where, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(where, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def fintune_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``FINTUNE_*`` variables set (settings overrides and the like), secrets masked."""
    env = os.environ if environ is None else environ
    return {key: masked(key, value) for key, value in sorted(env.items()) if key.upper().startswith("FINTUNE_")}


def thread_variables(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Those of :data:`THREAD_VARIABLES` that are set."""
    env = os.environ if environ is None else environ
    return {key: env[key] for key in THREAD_VARIABLES if key in env}


def masked(key: str, value: str) -> str:
    """``value`` fit for a result file or an error message: :data:`MASK` when ``key`` names a secret; a whole
    section written as JSON (``FINTUNE_SERVING='{"api_key": ...}'``) with its secret fields masked; a URL's
    password masked."""
    if _names_secret(key):
        return MASK
    try:
        data = json.loads(value)
    except ValueError:
        return mask_url_password(value)
    return json.dumps(_masked_data(data)) if isinstance(data, dict | list) else mask_url_password(value)


def _names_secret(name: str) -> bool:
    """Whether a variable, field or query-parameter name holds one of :data:`SECRET_WORDS`."""
    return any(word in name.upper() for word in SECRET_WORDS)


def _masked_data(data: Any) -> Any:
    """JSON values with every field whose name holds a secret word masked, and URL passwords in strings."""
    if isinstance(data, dict):
        return {k: MASK if _names_secret(str(k)) else _masked_data(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_masked_data(v) for v in data]
    return mask_url_password(data) if isinstance(data, str) else data


def mask_url_password(value: str) -> str:
    """``value`` with the password of a URL masked, as written in its user part (``redis://:pw@host``) or in its
    query (``redis://host/0?password=pw``, which redis-py reads too); a URL that does not parse wholly masked (it
    may hide one); anything else as it is."""
    try:
        url = urllib.parse.urlsplit(value)
        password = url.password
    except ValueError:
        return MASK if "://" in value else value
    if not url.scheme or not (password or url.query):
        return value
    head, mark, rest = value.partition("?")  # by hand: urlunsplit would turn unix:///path into unix:/path
    query, hash_mark, fragment = rest.partition("#")
    if password:  # as written (urlsplit does not unquote it); the user part comes before any path
        head = head.replace(f":{password}@", f":{MASK}@", 1)
    return head + mark + _masked_query(query) + hash_mark + fragment


def _masked_query(query: str) -> str:
    """A URL's query with the value of every parameter whose name holds a secret word masked."""
    items = (item.partition("=") for item in query.split("&")) if query else ()
    return "&".join(f"{name}={MASK}" if sep and _names_secret(urllib.parse.unquote_plus(name)) else name + sep + value
                    for name, sep, value in items)


def _git(folder: Path, *args: str) -> str | None:
    """The stripped output of ``git -C folder args``; None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


MATMUL_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""CPU flags that decide how fast bf16 and fp32 matrix products run (two Xeons may share one model name)."""


def _cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Which of :data:`MATMUL_FEATURES` this CPU reports in ``cpuinfo`` (empty where it cannot tell)."""
    flags = (_cpuinfo_field("flags", cpuinfo) or "").split()
    return [name for name in MATMUL_FEATURES if name in flags]


def _cpuinfo_field(key: str, cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The value of the first ``key`` line of ``cpuinfo``, or None where there is none or it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith(key)), None)
    except OSError:
        return None


def _memory_gb() -> float | None:
    """Total physical memory in GiB, when the OS tells."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * page_size / 2**30, 1)
