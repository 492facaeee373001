"""The Ray engine of ``fintune classify`` against the local one; writes benchmarks/results/ray_classify.json.

Classifies the 50agree test split through the offline pipeline (guard, breaker, model, checks) of a profile:
once in this process (the local engine, torch on every core) and once per ``--actors`` count on a private Ray
instance on this machine (``fintune.scale``: each replica one CPU, so one torch thread). For each run it records
the wall time from start to the last record, including Ray's start-up and each replica's model load, the
texts/s of that, and how many labels equal the local engine's. On one machine Ray can only share the same cores
out; the engine is for clusters, and this measures what it costs where it has nothing to gain.

Run: ``.venv/bin/python benchmarks/ray_classify.py [--profile cpu] [--actors 1 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from fintune.config import load_settings
from fintune.data import load_splits
from fintune.provenance import provenance
from fintune.scale import classify_on_ray, ray_cluster
from fintune.serving.service import OfflineRecords

RESULT = Path(__file__).parent / "results" / "ray_classify.json"


def local_run(texts: list[str], factory: OfflineRecords, chunk: int) -> tuple[float, list[dict[str, Any]]]:
    """Seconds to build the pipeline here and classify ``texts``, and the records."""
    started = time.perf_counter()
    classify = factory()
    records = [r for start in range(0, len(texts), chunk) for r in classify(texts[start : start + chunk])]
    return time.perf_counter() - started, records


def ray_run(texts: list[str], factory: OfflineRecords, actors: int) -> tuple[float, list[dict[str, Any]]]:
    """Seconds from starting a private Ray instance to the last record, and the records."""
    scale = factory.settings.scale.model_copy(update={"actors": actors})
    started = time.perf_counter()
    with ray_cluster(scale):
        records = [r for chunk in classify_on_ray(texts, factory, scale) for r in chunk]
    return time.perf_counter() - started, records


def run(profile: str, actor_counts: list[int]) -> dict[str, Any]:
    """Every run's figures and provenance."""
    settings = load_settings(profile)
    splits = load_splits(settings, "50agree")
    texts = [example.text for example in splits.test]
    local_s, local = local_run(texts, OfflineRecords(settings, redact_process_logs=False),
                               settings.serving.micro_batch_size)
    labels = [r.get("label") for r in local]
    runs = [{"engine": "local", "actors": None, "torch_threads": os.cpu_count(), "wall_s": round(local_s, 1),
             "texts_per_s": round(len(texts) / local_s, 2), "labels_equal_local": len(texts)}]
    for actors in actor_counts:
        seconds, records = ray_run(texts, OfflineRecords(settings), actors)
        runs.append({"engine": "ray", "actors": actors, "torch_threads": 1, "wall_s": round(seconds, 1),
                     "texts_per_s": round(len(texts) / seconds, 2),
                     "labels_equal_local": sum(r.get("label") == label for r, label in zip(records, labels,
                                                                                          strict=True))})
        print(json.dumps(runs[-1]), file=sys.stderr)
    return {
        "provenance": provenance("python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                                 packages=("fintune", "torch", "transformers", "ray")),
        "data": {"subset": splits.subset, "fingerprint": splits.fingerprint, "split": "test", "texts": len(texts)},
        "setup": {"profile": profile, "chunk_size": settings.scale.chunk_size,
                  "cpus_per_actor": settings.scale.cpus_per_actor,
                  "wall_s": "from start to the last record: Ray's start-up and every replica's model load included"},
        "runs": runs,
    }


def main() -> None:
    """Parse the arguments, run, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", help="Profile whose trained model is classified with.")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Replica counts to run on Ray.")
    parser.add_argument("--output", type=Path, default=RESULT, help="Where to write the JSON.")
    args = parser.parse_args()
    result = run(args.profile, args.actors)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
