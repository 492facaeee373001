"""Training step time of a QLoRA profile with its frozen NF4 layers decoded on every call against decoded once
(``training.dequantize_base``); writes benchmarks/results/training_step_<profile>.json.

Both variants train the same first ``--steps`` batches (same seed, same length-grouped order) from the same base,
in alternating rounds (A B B A ...) so that a slow spell of the machine hits both. Per variant: every step's
seconds, their sum and median, the logged losses, and whether the trained LoRA weights are bit-identical.

Run: ``.venv/bin/python benchmarks/training_step.py [--profile cpu] [--steps 24] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from fintune.config import Settings, load_settings
from fintune.data import load_splits
from fintune.evaluation import write_json
from fintune.model.loading import resolve_base
from fintune.model.training import build_trainer, loss_on_completion_positions_only
from fintune.provenance import provenance

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"nf4_decoded_every_call": False, "decoded_once": True}
"""Variant name -> ``training.dequantize_base``."""


class StepTimer(TrainerCallback):
    """Wall seconds of every optimizer step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        """Start the clock."""
        self._started = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        """Stop the clock."""
        self.seconds.append(time.perf_counter() - self._started)


def run(settings: Settings, decoded: bool, steps: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Train ``steps`` steps; the step seconds, the logged losses and the LoRA weights."""
    training = settings.model.training.model_copy(update={"dequantize_base": decoded, "logging_steps": 1})
    variant = settings.model_copy(update={"model": settings.model.model_copy(update={"training": training})})
    splits = load_splits(variant, variant.data.subset)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(variant.seed)
        trainer = build_trainer(variant, splits, resolve_base(variant.model, variant.cache_dir), Path(out), steps)
        trainer.add_callback(timer)
        with loss_on_completion_positions_only():
            trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lora = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    return timer.seconds, losses, lora


def main() -> None:
    """Measure both variants and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each variant, in A B B A order.")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    settings = load_settings(args.profile)
    order = [name for i in range(args.rounds) for name in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1])]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for name in order:
        seconds, losses, weights[name] = run(settings, VARIANTS[name], args.steps)
        runs[name].append({"step_seconds": [round(s, 3) for s in seconds], "total_s": round(sum(seconds), 1),
                           "median_step_s": round(statistics.median(seconds), 3), "losses": losses})
        print(f"{name}: {sum(seconds):.1f} s for {len(seconds)} steps", file=sys.stderr)
    first, second = (weights[name] for name in VARIANTS)
    summary = {name: {"total_s": round(sum(r["total_s"] for r in rs), 1),
                      "median_step_s": round(statistics.median(s for r in rs for s in r["step_seconds"]), 3)}
               for name, rs in runs.items()}
    result = {
        "provenance": provenance(" ".join(["python benchmarks/training_step.py", *sys.argv[1:]])),
        "profile": args.profile,
        "data": load_splits(settings, settings.data.subset).describe(),
        "steps_per_run": args.steps,
        "batch_size": settings.model.training.batch_size,
        "order": order,
        "summary": summary,
        "speedup_total": round(summary["nf4_decoded_every_call"]["total_s"] / summary["decoded_once"]["total_s"], 2),
        "identical_losses": len({tuple(r["losses"]) for rs in runs.values() for r in rs}) == 1,
        "identical_lora_weights": first.keys() == second.keys() and all(torch.equal(first[k], second[k])
                                                                         for k in first),
        "runs": runs,
    }
    output = args.output or RESULTS / f"training_step_{args.profile}.json"
    write_json(output, result)
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
