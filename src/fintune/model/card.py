"""The metadata file every trained model folder carries (``fintune.json``), and what makes a folder finished.

Light: imports nothing heavy, so the CLI can inspect a folder before loading torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from fintune.config import Settings
from fintune.errors import ArtifactError

CARD_FILE = "fintune.json"
"""Metadata written next to every trained model: backend, profile, model settings, data, metrics."""

CHECKPOINT_DIR = "checkpoints"
"""Sub-folder of a model folder holding the resumable QLoRA training checkpoints."""


def read_card(model_dir: Path) -> dict[str, Any]:
    """The ``fintune.json`` metadata of a trained model folder."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ArtifactError(f"{model_dir} holds no trained model ({CARD_FILE} missing); run `fintune train`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable ({exc}); retrain the model") from exc


WEIGHT_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "qlora": (("adapter_config.json",), ("adapter_model.safetensors", "adapter_model.bin")),
    "encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
}
"""Per backend, the files a trained folder holds beside its card (one of each group)."""


def check_weights(model_dir: Path, backend: str) -> None:
    """ArtifactError naming the first weight file ``model_dir`` lacks: loading without it was a traceback, or,
    with the hub reachable, a hub lookup of the folder's name as if it were a repository."""
    for group in WEIGHT_FILES[backend]:
        if not any((Path(model_dir) / name).is_file() for name in group):
            raise ArtifactError(f"{model_dir} has a card but no {' or '.join(group)}: its training did not finish or "
                                "the file was removed; retrain it (`fintune train ... --overwrite`)")


def unreadable_weights(model_dir: Path, exc: BaseException) -> ArtifactError:
    """The error for weight files that are there but cannot be read (truncated, of another format)."""
    return ArtifactError(f"the trained weights in {model_dir} are unreadable ({type(exc).__name__}: {exc}); "
                         "retrain the model (`fintune train ... --overwrite`)")


def card_version(model_dir: Path) -> str:
    """A trained model's version as clients may see it: ``trained-<date>-<hash of its card>``.

    The card changes with every training run and recalibration, so the hash tells models apart; the server's
    folder path is not in it (API responses carry the version).
    """
    return version_of(read_card(model_dir))


def version_of(card: dict[str, Any]) -> str:
    """The :func:`card_version` of a card already read."""
    date = str(card.get("provenance", {}).get("date", ""))[:10] or "undated"
    digest = hashlib.sha256(json.dumps(card, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return f"trained-{date}-{digest}"


def default_model_dir(settings: Settings, subset: str | None = None, profile: str | None = None) -> Path:
    """Where a profile's model trained on ``subset`` lives unless told otherwise: ``<output_dir>/models/<profile>``,
    or ``<profile>-<subset>`` for another subset than the profile's, so it never replaces the one served."""
    name = profile or settings.profile
    if subset and subset != settings.data.subset:
        name = f"{name}-{subset}"
    return settings.output_dir / "models" / name


def is_trained(model_dir: Path, profile: str, fingerprint: str) -> bool:
    """Whether ``model_dir`` holds a finished model of this profile trained on data with this fingerprint for as
    long as the profile plans (a shorter ``--max-steps`` trial is not it)."""
    card = finished_card(model_dir)
    return card is not None and mismatch(card, profile, fingerprint) is None


def mismatch(card: dict[str, Any], profile: str, fingerprint: str) -> str | None:
    """Why a finished model's card is not this profile trained as planned on this data, or None when it is."""
    if card.get("profile") != profile:
        return f"it is {card.get('profile')}, not {profile}"
    trained_on = str(card.get("data", {}).get("fingerprint", ""))
    if trained_on != fingerprint:
        return (f"it trained on {card.get('data', {}).get('subset')} data {trained_on[:16]}, not on "
                f"{fingerprint[:16]}")
    section = "encoder" if card.get("backend") == "encoder" else "training"
    planned = card.get("model_settings", {}).get(section, {}).get("max_steps")
    if card.get("max_steps") not in (None, planned):
        return f"it is a trial run of --max-steps {card['max_steps']}, not the profile's whole training"
    return None


def finished_card(model_dir: Path) -> dict[str, Any] | None:
    """The card of the finished model in ``model_dir``, or None when it holds none (or an interrupted run)."""
    try:
        card = read_card(model_dir)
    except ArtifactError:
        return None
    return card if card.get("complete") else None


def forget_training(model_dir: Path) -> None:
    """Remove a folder's card and checkpoints, so the next training starts from scratch instead of resuming."""
    (Path(model_dir) / CARD_FILE).unlink(missing_ok=True)
    shutil.rmtree(Path(model_dir) / CHECKPOINT_DIR, ignore_errors=True)
