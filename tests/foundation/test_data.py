"""Financial PhraseBank loading: encodings, malformed lines, dedup, stratified split, fingerprint, sources."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import pytest

from fintune import data
from fintune.config import load_settings
from fintune.data import load_examples, load_splits
from fintune.errors import DataFormatError, DataNotFoundError, UnknownSubsetError


def settings_for(folder: Path, **data_overrides: object):
    base = load_settings("cpu", data_dir=folder)
    if data_overrides:
        base = base.model_copy(update={"data": base.data.model_copy(update=data_overrides)})
    return base


def test_reads_latin1_and_utf8_files(tiny_data_dir: Path) -> None:
    for subset in ("50agree", "allagree"):
        texts = [e.text for e in load_examples(settings_for(tiny_data_dir), subset)]
        assert any("Hämäläinen" in text for text in texts), subset


def test_a_utf8_copy_of_a_latin1_subset_is_read_as_utf8(tmp_path: Path) -> None:
    folder = tmp_path / "utf8"
    folder.mkdir()  # 50agree is published in ISO-8859-1; this copy was re-saved as UTF-8, without a BOM
    (folder / "Sentences_50Agree.txt").write_bytes("Seppälä of Hämäläinen Oy left .@neutral\n".encode())
    [example] = load_examples(settings_for(folder), "50agree")
    assert example.text == "Seppälä of Hämäläinen Oy left ."  # not "SeppÃ¤lÃ¤"


def test_a_damaged_release_zip_is_a_data_error_saying_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "badzip"
    folder.mkdir()
    (folder / "FinancialPhraseBank-v1.0.zip").write_bytes(b"a truncated download")
    with pytest.raises(DataFormatError, match=r"not a readable zip.*download it again"):
        load_examples(settings_for(folder), "50agree")


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_a_zip_whose_member_is_damaged_is_a_data_error_too(tmp_path: Path, method: int) -> None:
    folder = tmp_path / "damaged"
    folder.mkdir()
    body = "".join(f"Net sales rose {i} % in quarter {i} of the year .@positive\n" for i in range(200)).encode()
    archive = folder / data.ZIP_NAME
    with zipfile.ZipFile(archive, "w", compression=method) as bundle:
        bundle.writestr("FinancialPhraseBank-v1.0/Sentences_AllAgree.txt", body)
    raw = bytearray(archive.read_bytes())
    middle = len(raw) // 3  # inside the member's data: the directory still opens, reading it fails
    raw[middle:middle + 8] = b"\xff" * 8
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match=r"not a readable zip \((error|BadZipFile).*download it again"):
        load_examples(settings_for(folder), "allagree")  # was a zlib.error or BadZipFile (CRC) traceback


def test_tolerates_crlf_and_bom(tmp_path: Path) -> None:
    folder = tmp_path / "crlf"
    folder.mkdir()
    body = "Sales rose 5 % .@positive\r\nProfit fell .@negative\r\n\r\nNo change , said Åke .@neutral\r\n"
    (folder / "Sentences_AllAgree.txt").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    examples = load_examples(settings_for(folder), "allagree")
    assert [(e.text, e.label) for e in examples] == [
        ("Sales rose 5 % .", "positive"),
        ("Profit fell .", "negative"),
        ("No change , said Åke .", "neutral"),
    ]


def test_sentence_may_contain_at_sign(tmp_path: Path) -> None:
    folder = tmp_path / "at"
    folder.mkdir()
    (folder / "Sentences_AllAgree.txt").write_text("Contact ir@example.com for details .@neutral\n")
    assert load_examples(settings_for(folder), "allagree")[0].text == "Contact ir@example.com for details ."


@pytest.mark.parametrize(
    "line", ["no label separator here", "Profit rose .@bullish", "@positive", "Profit rose .@"]
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "Sentences_AllAgree.txt").write_text(f"Sales rose .@positive\n{line}\n")
    with pytest.raises(DataFormatError, match=r"Sentences_AllAgree\.txt, line 2: expected 'sentence@label'"):
        load_examples(settings_for(folder), "allagree")


def test_unknown_subset() -> None:
    with pytest.raises(UnknownSubsetError, match="choose one of 50agree, 66agree, 75agree, allagree"):
        data.check_subset("90agree")
    assert data.check_subset(" AllAgree ") == "allagree"


def test_missing_data_directory_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"does not exist\. Fix: point FINTUNE_DATA_DIR"):
        load_examples(settings_for(tmp_path / "nowhere"))


def test_folder_without_files_lists_where_it_looked(tmp_path: Path) -> None:
    looked = r"looked in: .*Sentences_50Agree\.txt.*FinancialPhraseBank-v1\.0\.zip"
    with pytest.raises(DataNotFoundError, match=looked) as caught:
        load_examples(settings_for(tmp_path))
    assert "download" not in str(caught.value)  # a data_dir that is set is the only place looked in


def test_no_local_copy_and_no_hub_gives_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(data, "SHARED_DATA_DIR", tmp_path / "absent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; offline mode fails at once
    settings = load_settings("cpu").model_copy(update={"cache_dir": tmp_path / "cache"})
    with pytest.raises(DataNotFoundError) as caught:
        load_examples(settings)
    message = str(caught.value)
    assert "hf://datasets/takala/financial_phrasebank/data/FinancialPhraseBank-v1.0.zip" in message
    assert "FINTUNE_DATA_DIR" in message and str(tmp_path / "absent") in message
    assert "allow the download" in message  # no data_dir: the hub is one of the places, so this is a fix


def test_reads_the_original_release_zip(tmp_path: Path, tiny_data_dir: Path) -> None:
    folder = tmp_path / "zipped"
    folder.mkdir()
    with zipfile.ZipFile(folder / data.ZIP_NAME, "w") as bundle:
        for path in tiny_data_dir.iterdir():
            bundle.write(path, f"FinancialPhraseBank-v1.0/{path.name}")
    from_zip = load_splits(settings_for(folder), "66agree")
    from_text = load_splits(settings_for(tiny_data_dir), "66agree")
    assert from_zip.fingerprint == from_text.fingerprint
    assert from_zip.source.endswith("!FinancialPhraseBank-v1.0/Sentences_66Agree.txt")


def test_exact_duplicates_are_dropped_keeping_the_first(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    folder.mkdir()
    (folder / "Sentences_AllAgree.txt").write_text("A rose .@positive\nB fell .@negative\nA rose .@neutral\n")
    examples = load_examples(settings_for(folder), "allagree")
    assert [(e.id, e.text, e.label) for e in examples] == [(0, "A rose .", "positive"), (1, "B fell .", "negative")]


def test_split_is_stratified_disjoint_complete_and_seeded(tiny_data_dir: Path) -> None:
    settings = settings_for(tiny_data_dir, validation_fraction=0.2, test_fraction=0.2)
    splits = load_splits(settings)
    ids = [e.id for part in (splits.train, splits.validation, splits.test) for e in part]
    assert sorted(ids) == list(range(61))
    assert len(set(ids)) == len(ids)
    for part in (splits.validation, splits.test):
        counts = Counter(e.label for e in part)  # 20 % of 20 or 21 sentences per label
        assert set(counts) == {"negative", "neutral", "positive"} and all(4 <= n <= 5 for n in counts.values())
    again = load_splits(settings)
    assert again.fingerprint == splits.fingerprint and again.test == splits.test


def test_fingerprint_changes_with_the_split_seed(tiny_data_dir: Path) -> None:
    first = load_splits(settings_for(tiny_data_dir))
    other = load_splits(settings_for(tiny_data_dir, split_seed=7))
    assert first.source_sha256 == other.source_sha256
    assert first.fingerprint != other.fingerprint


def test_describe_is_json_ready(tiny_data_dir: Path) -> None:
    summary = load_splits(settings_for(tiny_data_dir)).describe()
    assert summary["sizes"]["train"] + summary["sizes"]["validation"] + summary["sizes"]["test"] == 61
    assert set(summary["label_counts"]["test"]) == {"negative", "neutral", "positive"}
    assert len(summary["fingerprint"]) == 64


@pytest.mark.needs_data
@pytest.mark.parametrize(
    ("subset", "unique", "counts"),
    [
        ("50agree", 4838, {"negative": 604, "neutral": 2872, "positive": 1362}),
        ("allagree", 2259, {"negative": 303, "neutral": 1386, "positive": 570}),
    ],
)
def test_real_phrasebank(shared_data_dir: Path, subset: str, unique: int, counts: dict[str, int]) -> None:
    splits = load_splits(load_settings("cpu"), subset)
    everything = splits.train + splits.validation + splits.test
    assert len(everything) == unique
    assert dict(Counter(e.label for e in everything)) == counts
    assert len(splits.test) == pytest.approx(unique * 0.1, abs=1)
    assert splits.source == str(shared_data_dir / data.SUBSET_FILES[subset])
