"""Scoring any sentiment classifier the same way: metrics, reports, plots, latency, throughput.

The baselines and the fine-tuned models are judged by these functions only, so their numbers are comparable.
Labels are always ordered as :data:`fintune.LABELS`; confusion-matrix rows are true labels, columns predictions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support  # noqa: E402

from fintune import LABELS  # noqa: E402


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    labels = list(LABELS)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    seen = set(y_true) | set(y_pred)
    present = np.array([label in seen for label in labels])  # sklearn's macro average: classes that occur
    per_class = {
        label: {
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(np.mean(f1[present])), 4) if present.any() else 0.0,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": labels,
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented UTF-8 JSON, creating the folder; returns the path."""
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    return replace_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Have ``write`` fill a temporary file beside ``path``, then rename it over ``path`` (creating the folder):
    a run killed while writing leaves the previous file, never a truncated one; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_classification_artifacts(metrics: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """``<name>_report.json``, ``<name>_confusion.json`` and ``<name>_confusion.png`` in ``out_dir``."""
    report = {key: metrics[key] for key in ("accuracy", "macro_f1", "per_class")}
    confusion = {"labels": metrics["labels"], "rows": "true label", "columns": "predicted label",
                 "matrix": metrics["confusion_matrix"]}
    return [
        write_json(out_dir / f"{name}_report.json", report),
        write_json(out_dir / f"{name}_confusion.json", confusion),
        plot_confusion_matrix(metrics, out_dir / f"{name}_confusion.png", title=name),
    ]


def plot_confusion_matrix(metrics: dict[str, Any], path: Path, title: str) -> Path:
    """A labelled heat map of the confusion matrix with counts and row-normalised shares."""
    matrix = np.asarray(metrics["confusion_matrix"], dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    labels = metrics["labels"]
    fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=120)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if shares[row, col] > 0.55 else "black"
        ax.text(col, row, f"{int(count)}\n{shares[row, col]:.0%}", ha="center", va="center", color=color)
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true")
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}", fontsize=10)
    return save_figure(fig, path)


def plot_comparison(scores: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Grouped bars of accuracy and macro-F1 per model, so a reader sees the floor at a glance."""
    names = list(scores)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6), dpi=120)
    for offset, metric in ((-0.18, "accuracy"), (0.18, "macro_f1")):
        values = [scores[name][metric] for name in names]
        bars = ax.bar(x + offset, values, width=0.34, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set(xticks=x, xticklabels=names, ylim=(0, 1.05), ylabel="score", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_reliability(bins: list[dict[str, float]], path: Path, title: str) -> Path:
    """Accuracy against mean confidence per confidence bin (a reliability diagram), each bin's count beside it.

    Points on the diagonal are calibrated: below it the model is more confident than it is right.
    """
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    if bins:
        confidence = [row["confidence"] for row in bins]
        accuracy = [row["accuracy"] for row in bins]
        ax.plot(confidence, accuracy, marker="o", label="model")
        for x, y, row in zip(confidence, accuracy, bins, strict=True):
            ax.annotate(str(row["count"]), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="mean confidence in bin", ylabel="accuracy in bin", title=title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG (folders made as needed), and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def latency_percentiles(predict_one: Callable[[str], object], texts: Sequence[str], samples: int) -> dict[str, float]:
    """p50 / p95 milliseconds of ``predict_one`` over ``samples`` calls cycling through ``texts``."""
    if not texts:
        raise ValueError("latency needs at least one text")
    predict_one(texts[0])  # warm-up: caches, lazy imports
    timings = []
    for i in range(samples):
        start = time.perf_counter()
        predict_one(texts[i % len(texts)])
        timings.append((time.perf_counter() - start) * 1000.0)
    return {
        "p50_ms": round(float(np.percentile(timings, 50)), 4),
        "p95_ms": round(float(np.percentile(timings, 95)), 4),
    }


def batch_throughput(predict_batch: Callable[[Sequence[str]], object], texts: Sequence[str]) -> float:
    """Sentences per second of one ``predict_batch`` call over all ``texts``."""
    start = time.perf_counter()
    predict_batch(texts)
    elapsed = time.perf_counter() - start
    return round(len(texts) / max(elapsed, 1e-9), 1)
