"""Where a number came from: the command, machine, date and library versions recorded beside every result."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

DEFAULT_PACKAGES = ("fintune", "numpy", "scikit-learn", "torch", "transformers", "peft", "trl", "bitsandbytes")


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
    """The record every result file carries: command, UTC date, machine and library versions."""
    return {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(packages),
    }


def command_line() -> str:
    """The command line of this process, as typed (``fintune baselines --subset 50agree``)."""
    program = os.path.basename(sys.argv[0]) if sys.argv else "python"
    return " ".join([program, *sys.argv[1:]])


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
