"""Matrix-product speed in bf16 and fp32 on this CPU; writes benchmarks/results/matmul_dtypes.json.

Why ``compute_dtype: auto`` (and ``inference.dtype: auto``) exist: whether bf16 or fp32 products are faster
depends on the CPU (``fintune.model.precision``), and on one without bf16 arithmetic torch emulates bf16 products
many times slower. This times the products of the ``cpu`` profile's shapes (SmolLM2-135M: hidden 576, MLP 1536,
a batch of 16 sentences of ~40 tokens) in both dtypes, with torch's default threads, and records what ``auto``
picks here, so a result file says which kind of machine a training or inference figure came from.

Run: ``.venv/bin/python benchmarks/matmul_dtypes.py [--output F]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _args import positive_int  # benchmarks/_args.py, beside this script

from fintune.evaluation import write_json
from fintune.model.precision import choose_dtype
from fintune.provenance import command_line, provenance

RESULT = Path(__file__).parent / "results" / "matmul_dtypes.json"
SHAPES = {"attention projection": (640, 576, 576), "MLP up": (640, 576, 1536), "MLP down": (640, 1536, 576)}
"""(rows, inner, columns) of the products timed: 16 sentences x 40 tokens against the cpu profile's weights."""


def gflops(rows: int, inner: int, columns: int, dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of ``rows x inner`` by ``inner x columns`` products in ``dtype``, repeated for about ``seconds``."""
    torch.manual_seed(0)
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, columns, dtype=dtype)
    a @ b  # warm-up: oneDNN and MKL pick their kernels on the first call
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        a @ b
        calls += 1
    return round(2 * rows * inner * columns * calls / (time.perf_counter() - started) / 1e9, 1)


def measure(seconds: float) -> dict[str, Any]:
    """Both dtypes on every shape, and the ratio fp32 / bf16."""
    products = {}
    for name, shape in SHAPES.items():
        fp32, bf16 = (gflops(*shape, dtype, seconds) for dtype in (torch.float32, torch.bfloat16))
        products[name] = {"shape": list(shape), "float32_gflops": fp32, "bfloat16_gflops": bf16,
                          "float32_over_bfloat16": round(fp32 / bf16, 2) if bf16 else None}
        print(f"{name:>22}: fp32 {fp32:7.1f}, bf16 {bf16:7.1f} GFLOP/s", flush=True)
    choice = choose_dtype()
    return {"provenance": provenance(command_line(keep_path=True), packages=("fintune", "torch")),
            "torch_threads": torch.get_num_threads(), "seconds_per_product": seconds, "products": products,
            "auto_picks": {"dtype": str(choice.dtype).removeprefix("torch."), "reason": choice.reason}}


def main() -> None:
    """Time the products and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=positive_int, default=2, help="Seconds each product is repeated for.")
    parser.add_argument("--output", type=Path, default=RESULT, help="Where to write the JSON.")
    args = parser.parse_args()
    try:
        print(f"written to {write_json(args.output, measure(args.seconds))}")
    except OSError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
