"""Financial PhraseBank: finding it, reading it, deduplicating it, splitting it, fingerprinting it.

Financial PhraseBank v1.0 (Malo et al. 2014, CC BY-NC-SA 3.0) ships four agreement levels as
``Sentences_{50,66,75,All}Agree.txt`` files of ``sentence@label`` lines (the first three ISO-8859-1, AllAgree
UTF-8), alone or inside ``FinancialPhraseBank-v1.0.zip``. This module finds one of them (the profile's
``data_dir``, else ``../shared/data/financial_phrasebank`` beside the project, else the Hugging Face dataset
repo), drops exact duplicate sentences, and makes a stratified, seeded train/validation/test split.

Every artifact built from the data records :attr:`DataSplits.fingerprint`: the sha256 of the source file and
of the ids in each split, so a reviewer can tell exactly which data a number came from.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fintune import LABELS
from fintune.config import PROJECT_ROOT, Settings
from fintune.errors import DataFormatError, DataNotFoundError, UnknownSubsetError

logger = logging.getLogger(__name__)

SUBSET_FILES: dict[str, str] = {
    "50agree": "Sentences_50Agree.txt",
    "66agree": "Sentences_66Agree.txt",
    "75agree": "Sentences_75Agree.txt",
    "allagree": "Sentences_AllAgree.txt",
}
"""Subset name -> file name in the original release."""

SUBSET_ENCODINGS: dict[str, str] = {
    "50agree": "iso-8859-1",
    "66agree": "iso-8859-1",
    "75agree": "iso-8859-1",
    "allagree": "utf-8",
}
"""Subset name -> the encoding its file is published in."""

ZIP_NAME = "FinancialPhraseBank-v1.0.zip"
SHARED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "financial_phrasebank"
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Example:
    """One labelled sentence; ``id`` is its position among the subset's unique sentences."""

    id: int
    text: str
    label: str


@dataclass(frozen=True)
class SourceFile:
    """The raw bytes of one subset file and where they came from."""

    subset: str
    content: bytes
    origin: str

    @property
    def sha256(self) -> str:
        """Hex sha256 of the raw file bytes."""
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class DataSplits:
    """A subset split into train / validation / test, with the fingerprint every artifact records."""

    subset: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    fingerprint: str
    source: str
    source_sha256: str

    def validation_head(self, limit: int | None) -> list[Example]:
        """The first ``limit`` validation sentences (all of them when ``limit`` is None): what a trained model is
        scored and calibrated on (``training.validation_limit``)."""
        return self.validation[:limit] if limit else self.validation

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: subset, fingerprint, source, split sizes and label counts."""
        splits = {"train": self.train, "validation": self.validation, "test": self.test}
        return {
            "subset": self.subset,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "sizes": {name: len(rows) for name, rows in splits.items()},
            "label_counts": {name: label_counts(rows) for name, rows in splits.items()},
        }


def label_counts(examples: list[Example]) -> dict[str, int]:
    """Number of examples per label, in LABELS order (zeros included)."""
    counts = Counter(example.label for example in examples)
    return {label: counts.get(label, 0) for label in LABELS}


def check_subset(subset: str) -> str:
    """The canonical subset name (case-insensitive), or :class:`UnknownSubsetError`."""
    name = subset.strip().lower()
    if name not in SUBSET_FILES:
        known = ", ".join(SUBSET_FILES)
        raise UnknownSubsetError(f"unknown subset {subset!r}: choose one of {known}")
    return name


def candidate_dirs(settings: Settings) -> list[Path]:
    """Folders searched for the data, in order: the configured ``data_dir``, else the shared folder."""
    if settings.data_dir is not None:
        return [Path(settings.data_dir).expanduser()]
    return [SHARED_DATA_DIR]


def find_source(settings: Settings, subset: str) -> SourceFile:
    """The raw file of ``subset`` from a local folder (text file or zip), else from the hub."""
    subset = check_subset(subset)
    if settings.data_dir is not None and not Path(settings.data_dir).expanduser().is_dir():
        raise DataNotFoundError(
            f"data directory {settings.data_dir} does not exist. Fix: point FINTUNE_DATA_DIR (or data_dir in "
            f"the profile) at a folder holding Sentences_*Agree.txt or {ZIP_NAME}, or unset it to use "
            f"{SHARED_DATA_DIR} or the hub."
        )
    looked: list[str] = []
    for folder in candidate_dirs(settings):
        found = _read_local(folder, subset, looked)
        if found is not None:
            return found
    if settings.data_dir is None and settings.data.allow_download:
        return _read_hub(settings, subset, looked)
    raise _not_found(looked, settings)


def _read_local(folder: Path, subset: str, looked: list[str]) -> SourceFile | None:
    """The subset's file from ``folder`` or from the release zip in it; None when neither is there."""
    text_file = folder / SUBSET_FILES[subset]
    looked.append(str(text_file))
    if text_file.is_file():
        return SourceFile(subset, text_file.read_bytes(), str(text_file))
    zip_file = folder / ZIP_NAME
    looked.append(str(zip_file))
    if zip_file.is_file():
        return _read_zip(zip_file.read_bytes(), subset, str(zip_file))
    return None


def _read_zip(archive: bytes, subset: str, origin: str) -> SourceFile:
    """The subset's file from the bytes of the original release zip."""
    wanted = SUBSET_FILES[subset]
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
            members = [name for name in bundle.namelist() if name.rsplit("/", 1)[-1] == wanted]
            if not members:
                raise DataFormatError(f"{origin} holds no {wanted}; is it the original FinancialPhraseBank-v1.0.zip?")
            return SourceFile(subset, bundle.read(members[0]), f"{origin}!{members[0]}")
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:  # damaged, or an odd method
        raise DataFormatError(
            f"{origin} is not a readable zip ({type(exc).__name__}: {exc}); download it again, or point "
            "FINTUNE_DATA_DIR at a folder holding the extracted Sentences_*Agree.txt"
        ) from exc


def _read_hub(settings: Settings, subset: str, looked: list[str]) -> SourceFile:
    """The subset's file from the release zip in the Hugging Face dataset repo (no loading script)."""
    from huggingface_hub import hf_hub_download  # deferred: only needed when there is no local copy

    reference = f"hf://datasets/{settings.data.hub_repo_id}/{settings.data.hub_filename}"
    looked.append(reference)
    try:
        path = hf_hub_download(
            repo_id=settings.data.hub_repo_id,
            filename=settings.data.hub_filename,
            repo_type="dataset",
            cache_dir=str(settings.cache_dir / "hub"),
        )
    except Exception as exc:  # offline, unreachable, missing file: all mean "not found here"
        logger.debug("hub download failed: %s", exc)
        raise _not_found(looked, settings, reason=f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return _read_zip(Path(path).read_bytes(), subset, reference)


def _not_found(looked: list[str], settings: Settings, reason: str = "") -> DataNotFoundError:
    """One error that says where we looked and how to fix it."""
    places = "; ".join(looked)
    why = f" (hub: {reason})" if reason else ""
    hint = f"set FINTUNE_DATA_DIR (or data_dir in the profile) to a folder holding Sentences_*Agree.txt or {ZIP_NAME}"
    if settings.data_dir is None:  # a data_dir that is set is the only place looked in: no download is tried
        hint += f", or allow the download from hf://datasets/{settings.data.hub_repo_id} with internet access"
    return DataNotFoundError(f"Financial PhraseBank not found; looked in: {places}{why}. Fix: {hint}.")


def decode(source: SourceFile) -> str:
    """The file's text: UTF-8 whenever it is valid UTF-8 (BOM or not), else ISO-8859-1, whichever the subset was
    published in. Valid UTF-8 with non-ASCII characters is next to never Latin-1, while reading a UTF-8 copy of a
    Latin-1 subset as Latin-1 would garble every accented name without a word ("Seppälä" as "SeppÃ¤lÃ¤")."""
    content = source.content.removeprefix(_UTF8_BOM)
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        if SUBSET_ENCODINGS[source.subset] == "utf-8":
            logger.warning("%s is not valid UTF-8; reading it as ISO-8859-1", source.origin)
        return content.decode("iso-8859-1")


def parse(source: SourceFile) -> list[tuple[str, str]]:
    """(sentence, label) pairs of every non-empty line; a malformed line is a :class:`DataFormatError`."""
    pairs = []
    for number, line in enumerate(decode(source).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        sentence, at, label = line.rpartition("@")
        label = label.strip().lower()
        if not at or not sentence.strip() or label not in LABELS:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise DataFormatError(
                f"{source.origin}, line {number}: expected 'sentence@label' with label in "
                f"{'/'.join(LABELS)}, got {shown!r}"
            )
        pairs.append((sentence.strip(), label))
    if not pairs:
        raise DataFormatError(f"{source.origin} holds no sentences")
    return pairs


def deduplicate(pairs: list[tuple[str, str]]) -> list[Example]:
    """Examples of the first occurrence of each exact sentence, numbered in file order."""
    seen: set[str] = set()
    examples = []
    for sentence, label in pairs:
        if sentence in seen:
            continue
        seen.add(sentence)
        examples.append(Example(id=len(examples), text=sentence, label=label))
    return examples


def load_examples(settings: Settings, subset: str | None = None) -> list[Example]:
    """All unique labelled sentences of ``subset`` (default: the profile's)."""
    return deduplicate(parse(find_source(settings, subset or settings.data.subset)))


def load_splits(settings: Settings, subset: str | None = None) -> DataSplits:
    """The stratified, seeded train / validation / test split of ``subset`` with its fingerprint."""
    source = find_source(settings, subset or settings.data.subset)
    examples = deduplicate(parse(source))
    train, validation, test = split(examples, settings)
    return DataSplits(
        subset=source.subset,
        train=train,
        validation=validation,
        test=test,
        fingerprint=fingerprint(source.sha256, train, validation, test),
        source=source.origin,
        source_sha256=source.sha256,
    )


def split(examples: list[Example], settings: Settings) -> tuple[list[Example], list[Example], list[Example]]:
    """Stratified train / validation / test lists, in id order, from the profile's fractions and seed."""
    from sklearn.model_selection import train_test_split  # a second to import: only where data is split

    cfg = settings.data
    labels = [example.label for example in examples]
    try:
        rest, test = train_test_split(
            examples, test_size=cfg.test_fraction, stratify=labels, random_state=cfg.split_seed
        )
        validation_share = cfg.validation_fraction / (1.0 - cfg.test_fraction)
        train, validation = train_test_split(
            rest, test_size=validation_share, stratify=[e.label for e in rest], random_state=cfg.split_seed
        )
    except ValueError as exc:  # too few sentences of a label for the fractions asked
        counts = ", ".join(f"{label} {labels.count(label)}" for label in sorted(set(labels)))
        raise DataFormatError(
            f"{len(examples)} sentences ({counts}) cannot be split {cfg.validation_fraction:g} / "
            f"{cfg.test_fraction:g} with every label on each side ({exc}); use more data or larger "
            "data.validation_fraction / data.test_fraction"
        ) from None
    by_id = lambda rows: sorted(rows, key=lambda e: e.id)  # noqa: E731
    return by_id(train), by_id(validation), by_id(test)


def fingerprint(source_sha256: str, *splits: list[Example]) -> str:
    """sha256 of the source file's hash and the ids in each split: equal fingerprints, equal data."""
    payload = json.dumps({"source": source_sha256, "splits": [[e.id for e in rows] for rows in splits]})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
