"""Plots of a training run (the loss curve), written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402

from fintune.evaluation import save_figure  # noqa: E402


def plot_loss_curve(
    log_history: list[dict[str, Any]], path: Path, title: str, ylabel: str = "training loss (completion tokens)"
) -> Path:
    """Training loss against optimizer step from a Trainer's ``state.log_history`` (``step`` and ``loss`` keys)."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
