"""The model card's version: what API clients are told about the model that answered them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fintune.errors import ArtifactError
from fintune.model.card import CARD_FILE, card_version


def test_the_version_follows_the_card_and_never_names_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "cpu"
    folder.mkdir(parents=True)
    card = {"provenance": {"date": "2026-12-02T01:27:01+00:00"}, "calibration": {"temperature": 1.2}}
    (folder / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    first = card_version(folder)
    assert first.startswith("trained-2026-12-02-") and len(first) == len("trained-2026-12-02-") + 12
    assert str(tmp_path) not in first and "cpu" not in first
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2), encoding="utf-8")  # same card, other layout
    assert card_version(folder) == first
    card["calibration"]["temperature"] = 1.3  # recalibrated: confidences change, so does the version
    (folder / CARD_FILE).write_text(json.dumps(card), encoding="utf-8")
    assert card_version(folder) != first
    with pytest.raises(ArtifactError, match="holds no trained model"):
        card_version(tmp_path / "typo")
