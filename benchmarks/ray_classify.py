"""The Ray engine of ``fintune classify`` against the local one; writes benchmarks/results/ray_classify.json.

Classifies the 50agree test split through the offline pipeline (guard, breaker, model, checks) of a profile:
once in this process (the local engine, as ``fintune classify`` runs it: torch's default threads, log records
redacted while it runs) and once per ``--actors`` count on a private Ray instance on this machine
(``fintune.scale``: each replica ``scale.cpus_per_actor`` CPUs; Ray runs no more replicas than the cores hold).
For each run it records the wall time from start to the last record, including Ray's start-up and each replica's
model load, the texts/s of that, the replicas that ran, the error and degraded records, and how many labelled
records have the local engine's label. On one machine Ray can only share the same cores out; the engine is for
clusters, and this measures what it costs where it has nothing to gain.

Run: ``.venv/bin/python benchmarks/ray_classify.py [--profile cpu] [--actors 1 2]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _args import positive_int  # benchmarks/_args.py, beside this script

from fintune.config import load_settings
from fintune.data import load_splits
from fintune.errors import FinTuneError
from fintune.evaluation import write_json
from fintune.provenance import command_line, provenance
from fintune.scale import classify_on_ray, ray_cluster, replicas_for
from fintune.serving.service import OfflineRecords

RESULT = Path(__file__).parent / "results" / "ray_classify.json"
Records = list[dict[str, Any]]


def local_run(texts: list[str], factory: OfflineRecords, chunk: int) -> tuple[float, Records]:
    """Seconds to build the pipeline here and classify ``texts`` as ``fintune classify`` does locally (log records
    redacted until the run ends), and the records."""
    started = time.perf_counter()
    classify, undo_log_redaction = factory.in_this_process()
    try:
        records = [r for start in range(0, len(texts), chunk) for r in classify(texts[start : start + chunk])]
    finally:
        undo_log_redaction()
    return time.perf_counter() - started, records


def ray_run(texts: list[str], factory: OfflineRecords, actors: int) -> tuple[float, Records, int]:
    """Seconds from starting a private Ray instance to the last record, the records, and the replicas that ran."""
    scale = factory.settings.scale.model_copy(update={"actors": actors})
    started = time.perf_counter()
    with ray_cluster(scale):
        ran = replicas_for(scale, len(texts))
        records = [r for chunk in classify_on_ray(texts, factory, scale) for r in chunk]
    return time.perf_counter() - started, records, ran


def tally(records: Records, reference: list[str | None]) -> dict[str, Any]:
    """Error, degraded and labelled records, and how many labelled ones have the label of ``reference`` (where that
    is a label too: an error on both sides is no agreement)."""
    pairs = [(r.get("label"), ref) for r, ref in zip(records, reference, strict=True)]
    compared = [(label, ref) for label, ref in pairs if label is not None and ref is not None]
    return {
        "errors": sum(r.get("error") is not None for r in records),
        "degraded": sum(bool(r.get("degraded")) for r in records),
        "labelled": sum(label is not None for label, _ in pairs),
        "labels_compared": len(compared),
        "labels_equal_local": sum(label == ref for label, ref in compared),
        "models": models(records),
    }


def models(records: Records) -> list[dict[str, Any]]:
    """The distinct ``model`` identities (name, profile, version) of the labelled records, in order of appearance."""
    seen: list[dict[str, Any]] = []
    for record in records:
        model = record.get("model")
        if model is not None and model not in seen:
            seen.append(model)
    return seen


def timing(seconds: float, texts: int) -> dict[str, float]:
    """Wall seconds and texts per second of one run."""
    return {"wall_s": round(seconds, 1), "texts_per_s": round(texts / seconds, 2)}


def run(profile: str, actor_counts: list[int]) -> dict[str, Any]:
    """Every run's figures and provenance."""
    settings = load_settings(profile)
    splits = load_splits(settings, "50agree")
    texts = [example.text for example in splits.test]
    local_s, local = local_run(texts, OfflineRecords(settings), settings.serving.micro_batch_size)
    labels = [r.get("label") for r in local]
    runs = [{"engine": "local", "actors_requested": None, "actors_ran": None, "cpus_per_actor": None,
             "torch_threads": torch.get_num_threads(), **timing(local_s, len(texts)), **tally(local, labels)}]
    print(json.dumps(runs[-1]), file=sys.stderr)
    for actors in actor_counts:
        seconds, records, ran = ray_run(texts, OfflineRecords(settings), actors)
        runs.append({"engine": "ray", "actors_requested": actors, "actors_ran": ran,
                     "cpus_per_actor": settings.scale.cpus_per_actor, "torch_threads": None,
                     **timing(seconds, len(texts)), **tally(records, labels)})
        print(json.dumps(runs[-1]), file=sys.stderr)
    return {
        "provenance": provenance(command_line(keep_path=True), packages=("fintune", "torch", "transformers", "ray")),
        "data": {"subset": splits.subset, "fingerprint": splits.fingerprint, "split": "test", "texts": len(texts)},
        "model": (models(local) or [None])[0],
        "setup": {"profile": profile, "chunk_size": settings.scale.chunk_size,
                  "cpus_per_actor": settings.scale.cpus_per_actor,
                  "wall_s": "from start to the last record: Ray's start-up and every replica's model load included",
                  "torch_threads": "measured in this process for the local run; not measured inside Ray's replicas "
                  "(null), whose CPUs are cpus_per_actor as configured",
                  "labels_equal_local": "records labelled in both this run and the local one, with the same label"},
        "runs": runs,
    }


def main() -> None:
    """Parse the arguments, run, write the JSON; a configuration error ends in one line and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", help="Profile whose trained model is classified with.")
    parser.add_argument("--actors", type=positive_int, nargs="+", default=[1, 2],
                        help="Replica counts to ask Ray for (it runs no more than the cores hold).")
    parser.add_argument("--output", type=Path, default=RESULT, help="Where to write the JSON.")
    args = parser.parse_args()
    try:
        write_json(args.output, run(args.profile, args.actors))
    except (FinTuneError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
