"""Plots of a model: its training loss curve and its reliability diagram, written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss against optimizer step from a Trainer's ``state.log_history``."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
