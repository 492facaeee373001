"""The metadata file every trained model folder carries (``fintune.json``): light, imports nothing heavy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fintune.errors import ArtifactError

CARD_FILE = "fintune.json"
"""Metadata written next to every trained model: backend, profile, model settings, data, metrics."""


def read_card(model_dir: Path) -> dict[str, Any]:
    """The ``fintune.json`` metadata of a trained model folder."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ArtifactError(f"{model_dir} holds no trained model ({CARD_FILE} missing); run `fintune train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable ({exc}); retrain the model") from exc


def is_trained(model_dir: Path, profile: str, fingerprint: str) -> bool:
    """Whether ``model_dir`` holds a finished model of this profile trained on data with this fingerprint."""
    try:
        card = read_card(model_dir)
    except ArtifactError:
        return False
    return bool(card.get("complete")) and card.get("profile") == profile and (
        card.get("data", {}).get("fingerprint") == fingerprint
    )
