"""Which floating-point type inference computes in: what ``auto`` means on each kind of machine.

On a GPU, ``auto`` is bf16 wherever the GPU supports it. On a CPU, whether bf16 beats fp32 depends on more than
"has bf16 instructions", because torch multiplies fp32 with MKL and bf16 with oneDNN. Measured with the 2-core
``cpu`` and ``encoder`` models (``benchmarks/results/model_inference_cpu*.json``, README "Inference paths"):

======================================  ====================================  ==============================
CPU                                     bf16 against fp32, ms a sentence      probable cause
======================================  ====================================  ==============================
Intel Xeon with AMX                     2x faster (22.7 / 46.7, merged)       AMX tiles multiply bf16
AMD EPYC with AVX512-BF16               3.7x faster (12.6 / 46.3, merged)     MKL's AVX2 fp32 code on AMD
Intel Xeon, AVX512-BF16 but no AMX      1.6x slower (75.0 / 46.8, decoded)    MKL's AVX-512 fp32 is faster
======================================  ====================================  ==============================

So ``auto`` is bf16 on a CPU with AMX, or with AVX512-BF16 when it is not an Intel CPU; fp32 everywhere else:
where bf16 would be emulated, and where the vendor is unknown (the vendor id comes from ``/proc/cpuinfo``). The
rule reads the CPU's features, never a timing, so two processes on one machine always compute alike however busy
it is. Naming ``bfloat16`` or ``float32`` overrides it.

This module imports only torch, so the encoder fallback can use it without the QLoRA stack.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DtypeChoice", "choose_dtype", "resolve_dtype"]

logger = logging.getLogger(__name__)
_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    """What ``auto`` resolved to on this machine, and why."""

    dtype: torch.dtype
    reason: str


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a settings name; ``auto`` is :func:`choose_dtype`'s choice for this machine."""
    if name == "auto":
        return choose_dtype().dtype
    return getattr(torch, name)


@functools.cache
def choose_dtype() -> DtypeChoice:
    """bf16 on a GPU that supports it and on CPUs where bf16 products are the faster ones, else fp32."""
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        choice = DtypeChoice(torch.bfloat16 if supported else torch.float32,
                             f"the GPU {'supports' if supported else 'lacks'} bf16")
    else:
        choice = cpu_choice(_cpu_flag("_is_amx_tile_supported"), _cpu_flag("_is_avx512_bf16_supported"),
                            cpu_vendor())
    logger.info("dtype auto -> %s: %s", str(choice.dtype).removeprefix("torch."), choice.reason)
    return choice


def cpu_choice(amx: bool, avx512_bf16: bool, vendor: str) -> DtypeChoice:
    """The rule of the module docstring for a CPU with these features and vendor id (``GenuineIntel``, ...)."""
    if amx:
        return DtypeChoice(torch.bfloat16, "the CPU has AMX tiles")
    if avx512_bf16 and vendor not in ("", "GenuineIntel"):
        return DtypeChoice(torch.bfloat16, f"the CPU ({vendor}) has AVX512-BF16 and is not an Intel one, "
                                           "where bf16 products were the faster ones")
    if avx512_bf16:
        return DtypeChoice(torch.float32, f"the CPU ({vendor or 'unknown vendor'}) has AVX512-BF16 but no AMX, "
                                          "where MKL's AVX-512 fp32 products are the faster ones")
    return DtypeChoice(torch.float32, "the CPU has no bf16 arithmetic")


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``; empty when unknown)."""
    try:
        for line in _CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("vendor_id"):
                return line.partition(":")[2].strip()
    except OSError:  # not Linux: the rule then treats the vendor as unknown
        pass
    return ""


def _cpu_flag(probe: str) -> bool:
    """One of torch.cpu's private feature probes; False where this torch has no such probe."""
    return bool(getattr(torch.cpu, probe, lambda: False)())
