"""Inference paths of a trained QLoRA adapter; writes benchmarks/results/model_inference_<profile>[_<subset>].json.

Scores the test split with the same adapter seven ways and compares them with the unmerged NF4 model (the model
exactly as it was trained):

* ``nf4``: the NF4 base + the LoRA adapter, unmerged, embeddings/norms/head in fp32 as in training, in left-padded
  length buckets with the model's own attention (the reference; never packed);
* ``nf4_bf16``: the same with embeddings/norms/head left in bf16 (``inference.upcast_unquantized: false``);
* ``decoded``: each 4-bit layer's weights decoded once at load (bf16, the compute dtype), embeddings/norms/head
  in fp32, the adapter unmerged (``inference.dequantize_base: true``): what ``nf4`` computes, without decoding
  on every call;
* ``decoded_bf16``: the same with embeddings/norms/head in bf16;
* ``decoded_fp32``: ``decoded`` with the decoded weights held and multiplied in fp32 (``inference.dtype:
  float32``): the same weight values, fp32 products;
* ``merged_bf16``: the NF4 base de-quantized, the adapter merged into it in fp32, bf16 weights;
* ``merged_fp32``: the same in float32.

Every other path scores as the profile does: packed (``inference.packing``: one padding-free row of up to
``inference.batch_size`` sentences and ``inference.pack_tokens`` tokens) when the profile packs, else in length
buckets. For the profile's own path (and each path named with ``--paths``), also random 16-sentence groups (what
the service's micro-batches look like): left-padded as one batch per group, in the profile's length buckets
(``inference.min_length_ratio``), and packed.

For each: milliseconds per sentence over the whole test split (median of ``--repeats`` passes), single-sentence
p50, the weights' memory (parameters and buffers), and the share of test sentences whose label agrees with the
NF4 reference, plus the largest probability gap.

Run: ``.venv/bin/python benchmarks/model_inference.py --model outputs/models/cpu``
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _args import positive_int  # benchmarks/_args.py, beside this script

from fintune import LABELS
from fintune.config import InferenceSettings, Settings, load_settings
from fintune.data import load_splits
from fintune.errors import FinTuneError
from fintune.evaluation import classification_metrics, latency_percentiles, write_json
from fintune.model.assessment import unseen_test_examples
from fintune.model.card import read_card
from fintune.model.inference import SentimentClassifier
from fintune.model.precision import resolve_dtype
from fintune.provenance import command_line, provenance

RESULTS = Path(__file__).parent / "results"
PATHS: dict[str, dict[str, Any]] = {
    "nf4": dict(merge=False, upcast_unquantized=True, packing=False),
    "nf4_bf16": dict(merge=False, upcast_unquantized=False),
    "decoded": dict(merge=False, dequantize_base=True, upcast_unquantized=True),
    "decoded_bf16": dict(merge=False, dequantize_base=True, upcast_unquantized=False),
    "decoded_fp32": dict(merge=False, dequantize_base=True, upcast_unquantized=True, dtype="float32"),
    "merged_bf16": dict(merge=True, dtype="bfloat16"),
    "merged_fp32": dict(merge=True, dtype="float32"),
}
"""Path name -> how its classifier is loaded (``merge``) and which inference settings it changes."""


def score(
    classifier: SentimentClassifier, texts: list[str], labels: list[str], samples: int, repeats: int
) -> dict[str, Any]:
    """Probabilities, batched ms/sentence, single-sentence latency and quality of one inference path."""
    classifier.predict_proba(texts[:8])  # warm-up
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        probabilities = classifier.predict_proba(texts)
        passes.append(time.perf_counter() - started)
    elapsed = float(np.median(passes))
    predicted = [LABELS[int(i)] for i in probabilities.argmax(axis=1)]
    quality = classification_metrics(labels, predicted)
    latency = latency_percentiles(lambda t: classifier.predict_proba([t]), texts, samples)
    return {
        "probabilities": probabilities,
        "batch_ms_per_sentence": round(1000 * elapsed / len(texts), 2),
        "single_p50_ms": latency["p50_ms"],
        "single_p95_ms": latency["p95_ms"],
        "accuracy": quality["accuracy"],
        "macro_f1": quality["macro_f1"],
        "weights_mib": round(classifier.model.get_memory_footprint() / 2**20, 1),
    }


def profile_path(inference: InferenceSettings) -> str:
    """Which of the measured paths the profile serves."""
    bf16 = resolve_dtype(inference.dtype) == torch.bfloat16  # auto: this machine's choice
    if inference.merge_adapter:
        return "merged_bf16" if bf16 else "merged_fp32"
    if inference.dequantize_base and not bf16:
        return "decoded_fp32"
    path = "decoded" if inference.dequantize_base else "nf4"
    return path if inference.upcast_unquantized else f"{path}_bf16"


def mixed_groups(
    padded: SentimentClassifier, packed: SentimentClassifier | None, texts: list[str], size: int, groups: int
) -> dict[str, Any]:
    """ms/sentence on random groups of ``size`` test sentences (what the service's micro-batches look like): one
    left-padded batch per group (ratio 0), the profile's length buckets (``min_length_ratio``), and packed rows
    (when the model packs)."""
    rng = random.Random(0)
    samples = [rng.sample(texts, size) for _ in range(groups)]
    configured = padded.settings
    figures: dict[str, Any] = {"group_size": size, "groups": groups}

    def timed(name: str, classifier: SentimentClassifier) -> None:
        classifier.predict_proba(samples[0])  # warm-up
        started = time.perf_counter()
        for group in samples:
            classifier.predict_proba(group)
        figures[f"{name}_ms_per_sentence"] = round(1000 * (time.perf_counter() - started) / (size * groups), 2)

    for ratio in (0.0, configured.min_length_ratio):
        padded.settings = configured.model_copy(update={"min_length_ratio": ratio})
        timed(f"ratio_{ratio:g}", padded)
    padded.settings = configured
    if packed is not None:
        timed("packed", packed)
    return figures


def with_inference(settings: Settings, **update: Any) -> Settings:
    """``settings`` with some of its inference settings changed."""
    inference = settings.model.inference.model_copy(update=update)
    return settings.model_copy(update={"model": settings.model.model_copy(update={"inference": inference})})


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Share of identical argmax labels and the largest absolute probability difference."""
    return {
        "label_agreement": round(float((reference.argmax(1) == other.argmax(1)).mean()), 4),
        "max_probability_gap": round(float(np.abs(reference - other).max()), 4),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="A folder written by `fintune train`.")
    parser.add_argument("--subset", default=None, help="Test split to score (default: the model's own subset).")
    parser.add_argument("--latency-samples", type=positive_int, default=None,
                        help="Single-sentence predictions timed per path for p50/p95 (default: the profile's "
                        "model.inference.latency_samples).")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="Batched passes over the test split (median kept).")
    parser.add_argument("--paths", nargs="+", default=None,
                        help="Only these paths (nf4, the reference, is always scored), each also timed on random "
                        "16-sentence groups; default: all, the groups for the profile's path only.")
    parser.add_argument("--output", type=Path, default=None,
                        help="Result JSON (default: benchmarks/results/model_inference_<profile>.json, with _<subset> "
                        "added when the subset is not the profile's default).")
    return parser


def default_output(profile: str, subset: str, profile_subset: str) -> Path:
    """``model_inference_<profile>.json``, with ``_<subset>`` when it is not the profile's, so runs on another
    subset do not overwrite it."""
    suffix = "" if subset == profile_subset else f"_{subset}"
    return RESULTS / f"model_inference_{profile}{suffix}.json"


def main() -> None:
    """Score every path and write the result file; a configuration error ends in one line and exit code 2."""
    parser = build_parser()
    args = parser.parse_args()
    unknown = set(args.paths or []) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {sorted(PATHS)}")
    try:
        output = measure(args)
    except (FinTuneError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"written to {output}")


def measure(args: argparse.Namespace) -> Path:
    """Score the chosen paths of ``args.model`` and write the result file; returns its path."""
    paths = {name: how for name, how in PATHS.items() if not args.paths or name == "nf4" or name in args.paths}
    card = read_card(args.model)
    profile = card["profile"]
    settings = load_settings(profile)
    subset = args.subset or card["data"]["subset"]
    splits = load_splits(settings, subset)
    samples = args.latency_samples or settings.model.inference.latency_samples
    test = unseen_test_examples(settings, splits, card)  # never sentences the model trained on
    texts, labels = [ex.text for ex in test], [ex.label for ex in test]
    results: dict[str, Any] = {}
    for name, how in paths.items():
        path_settings = with_inference(
            settings, dtype=how.get("dtype", "bfloat16"), upcast_unquantized=how.get("upcast_unquantized", True),
            dequantize_base=how.get("dequantize_base", False),
            packing=how.get("packing", settings.model.inference.packing),
        )
        classifier = SentimentClassifier.from_pretrained(args.model, path_settings, merge=how["merge"])
        results[name] = {"packed": classifier.packed,
                         **score(classifier, texts, labels, samples, args.repeats)}
        if name == profile_path(settings.model.inference) or name in (args.paths or []):
            # packing switches the model's attention, so the padded timings need a model of their own
            padded = classifier if not classifier.packed else SentimentClassifier.from_pretrained(
                args.model, with_inference(path_settings, packing=False), merge=how["merge"])
            packed = classifier if classifier.packed else None
            results[name]["mixed_groups"] = mixed_groups(padded, packed, texts, size=16, groups=25)
            del padded, packed
        del classifier
        print(f"{name}: {results[name]['batch_ms_per_sentence']} ms/sentence batched, "
              f"accuracy {results[name]['accuracy']:.4f}", flush=True)
    reference = results["nf4"]["probabilities"]
    for figures in results.values():
        figures.update(agreement(reference, figures.pop("probabilities")))
    output = args.output or default_output(profile, splits.subset, settings.data.subset)
    return write_json(output, {
        "provenance": provenance(command_line(keep_path=True)),
        "model": {"dir": str(args.model), "profile": profile, "base_model": card["base_model"],
                  "trained_fingerprint": card["data"]["fingerprint"]},
        "data": {**splits.describe(), "evaluated_sentences": len(texts)},
        "threads": torch.get_num_threads(),
        "batch_size": settings.model.inference.batch_size,
        "pack_tokens": settings.model.inference.pack_tokens,
        "latency_samples": samples,
        "paths": results,
    })


if __name__ == "__main__":
    main()
