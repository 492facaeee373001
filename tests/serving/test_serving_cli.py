"""`fintune classify` runs the service's pipeline offline and writes JSONL; `fintune serve` prints URL and curl."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest
from serving_helpers import PII_TEXT, PII_VALUES

from fintune.cli import main
from fintune.cli.inputs import read_texts
from fintune.cli.serve_commands import example_curl
from fintune.config import load_settings
from fintune.errors import InvalidInputError
from fintune.model.card import card_version


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch, tiny_data_dir: Path, tmp_path: Path) -> None:
    """Tiny data, a private cache and output folder."""
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("FINTUNE_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("FINTUNE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
def test_classify_file_writes_one_redacted_record_per_text(
    offline_env: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    rows = [{"id": "a", "text": "Net sales rose 5 %."}, {"id": "b", "text": PII_TEXT}, {"id": "c", "text": " "}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "new" / "out.jsonl"  # its folder is made, as every command's output folder
    code = main(["classify", "--profile", "tiny-mistral", "--input", str(source), "--output", str(out)])
    _, err = capfd.readouterr()
    assert code == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert records[0]["label"] in {"negative", "neutral", "positive"} and records[0]["degraded"] is False
    assert records[1]["guardrail"]["pii_count"] == 3
    assert records[2]["error"]["code"] == "invalid_input"
    assert "classify: 100%" in err  # the progress bar, on stderr
    assert "holds no trained model: the untrained tiny-mistral answers (version base-untuned)" in err
    assert not out.with_name("out.jsonl.part").exists()  # written whole, then renamed
    for value in PII_VALUES:
        assert value not in out.read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_run_whose_model_fails_exits_1_and_one_that_cannot_load_it_stops(
    offline_env: None, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("Net sales rose 5 %.\n \nProfit fell.\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["classify", "--profile", "tiny-mistral", "--input", str(source), "--output", str(out)]
    monkeypatch.setenv("FINTUNE_SERVING__DEGRADED_MODE", "fail")
    monkeypatch.setenv("FINTUNE_SERVING__FAULTS__RATE", "1")  # every model call raises
    assert main(args) == 1
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["error"]["code"] for r in records] == ["model_unavailable", "model_unavailable"]  # blank line skipped
    err = capfd.readouterr().err
    assert "2 of 2 texts got no answer (2 model_unavailable" in err

    monkeypatch.delenv("FINTUNE_SERVING__FAULTS__RATE")
    broken = tmp_path / "broken"  # a card, but no adapter beside it
    broken.mkdir()
    (broken / "fintune.json").write_text(json.dumps({"backend": "qlora", "profile": "tiny-mistral",
                                                     "complete": True}), encoding="utf-8")
    assert main([*args, "--model", str(broken)]) == 2  # not a file of baseline answers
    assert "the model did not load" in capfd.readouterr().err


def test_classify_reads_a_pipe_as_text(tmp_path: Path) -> None:
    pipe = tmp_path / "texts"  # /dev/stdin, <(...): no suffix to tell the format by ('unknown input format')
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=("Net sales rose.\nProfit fell.\n",), daemon=True)
    writer.start()
    assert list(read_texts(pipe)) == [("1", "Net sales rose."), ("2", "Profit fell.")]
    writer.join(10)


def test_input_formats_and_their_errors(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("Profit fell.\n\nSales rose.\n", encoding="utf-8")
    (tmp_path / "a.csv").write_text('id,text\nx1,"Profit fell, again."\n', encoding="utf-8")
    assert list(read_texts(tmp_path / "a.txt")) == [("1", "Profit fell."), ("3", "Sales rose.")]
    assert list(read_texts(tmp_path / "a.csv")) == [("x1", "Profit fell, again.")]
    (tmp_path / "bom.csv").write_bytes("\ufefftext,id\nProfit fell.,r1\n".encode())  # as spreadsheets save it
    assert list(read_texts(tmp_path / "bom.csv")) == [("r1", "Profit fell.")]
    (tmp_path / "latin1.txt").write_bytes("Profit fell.\nNet sales rose in K\xf6ln.\n".encode("latin-1"))
    assert main(["classify", "--input", str(tmp_path / "latin1.txt")]) == 2
    (tmp_path / "a.xml").write_text("<x/>", encoding="utf-8")
    assert main(["classify", "--input", str(tmp_path / "a.xml")]) == 2
    assert main(["classify"]) == 2
    assert main(["classify", "--actors", "2", "Sales rose."]) == 2
    err = capfd.readouterr().err
    assert "only apply with --engine ray" in err
    assert "use .txt, .csv or .jsonl" in err and "either a TEXT argument or --input" in err
    assert "latin1.txt:2 is not UTF-8 text" in err and "Traceback" not in err


def test_a_bad_csv_or_an_empty_input_is_one_error_before_any_model_loads(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lines = ["id,text", *(f'{n},Row {n} text.' for n in range(1, 5)), '5,"Row 5 has a stray quote',
             *(f"{n},Row {n} text." for n in range(6, 100))]
    (tmp_path / "quote.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="quote.csv:6 is not valid CSV .*unclosed quote"):
        list(read_texts(tmp_path / "quote.csv"))  # not 5 rows and 94 silently lost
    (tmp_path / "semi.csv").write_text("id;text\n1;Profit fell.\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="semi.csv:2 has no 'text' field \\(it has: 'id;text'\\)"):
        list(read_texts(tmp_path / "semi.csv"))
    (tmp_path / "ids.jsonl").write_text('{"id": null, "text": "a"}\n{"id": "", "text": "b"}\n', encoding="utf-8")
    assert list(read_texts(tmp_path / "ids.jsonl")) == [("1", "a"), ("2", "b")]
    (tmp_path / "odd.jsonl").write_text('{"id": "x\\ud800", "text": "a"}\n', encoding="utf-8")
    assert list(read_texts(tmp_path / "odd.jsonl")) == [("x\\ud800", "a")]  # writable as UTF-8
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    assert main(["classify", "--input", str(tmp_path / "empty.txt")]) == 2
    assert main(["classify", "--output", str(tmp_path / "empty.txt" / "out.jsonl"), "Sales rose."]) == 2
    assert main(["classify", "--output", str(tmp_path), "Sales rose."]) == 2  # before the run, not after it
    assert main(["classify", "--input", str(tmp_path)]) == 2
    (tmp_path / "body.jsonl").write_text('{"body": "Sales rose."}\n', encoding="utf-8")
    assert main(["classify", "--input", str(tmp_path / "body.jsonl")]) == 2
    err = capfd.readouterr().err
    assert "empty.txt holds no text to classify" in err and "empty.txt is a file, so" in err
    assert "is a folder, not a file: name a file with --output" in err  # the output folder
    assert "is a folder, not a file: name a .txt" in err  # the input folder
    assert "body.jsonl:1 has no 'text' field" in err  # path:line, as every other input error
    assert "name the text's field with --text-column" in err and "save the CSV" not in err  # a JSONL file
    assert "Traceback" not in err


def test_serve_prints_a_working_curl() -> None:
    curl = example_curl("http://127.0.0.1:8000", load_settings("tiny-mistral"))
    assert curl.startswith("curl -s -X POST http://127.0.0.1:8000/v1/classify")
    assert json.loads(curl.split("-d '", 1)[1].rstrip("'"))["text"]


def test_a_served_folder_from_the_environment_is_checked_like_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FINTUNE_SERVING__MODEL_DIR", str(tmp_path / "typo"))
    assert main(["serve", "--profile", "tiny-mistral", "--port", "1"]) == 2  # before binding or loading anything
    err = capfd.readouterr().err
    assert "typo" in err and "fintune.json" in err and "Traceback" not in err


def test_serve_refuses_a_taken_port_before_loading_anything(capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--profile", "tiny-mistral", "--port", str(port)]) == 2
    err = capfd.readouterr().err
    assert f"127.0.0.1:{port} is already in use; choose another with --port" in err and "Traceback" not in err
    assert main(["serve", "--port", "70000"]) == 2
    assert "Invalid value for '--port'" in capfd.readouterr().err


def test_a_model_folder_without_a_trained_model_is_refused(
    offline_env: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from fintune.errors import ArtifactError
    from fintune.serving.model_adapter import load_classifier

    assert main(["classify", "--model", str(tmp_path / "typo"), "Sales rose 5 %."]) == 2
    assert "holds no trained model" in capfd.readouterr().err
    settings = load_settings("tiny-mistral")
    named = settings.model_copy(update={"serving": settings.serving.model_copy(update={"model_dir": tmp_path})})
    with pytest.raises(ArtifactError, match="never|no trained model"):  # the service: degraded, not untrained
        load_classifier(named)


@pytest.mark.slow
def test_classify_serves_the_model_folder_it_is_given(
    offline_env: None, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "trained-encoder"
    monkeypatch.setenv("FINTUNE_MODEL__ENCODER__DISTILL_FROM", "null")  # labels only: no trained teacher here
    assert main(["train", "--profile", "encoder", "--output-dir", str(folder), "--max-steps", "1"]) == 0
    capfd.readouterr()
    assert main(["classify", "--profile", "encoder", "--model", str(folder), "Sales rose 5 %."]) == 0
    record = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert record["model"]["version"] == card_version(folder) and record["degraded"] is False
    assert card_version(folder).startswith("trained-20") and str(folder) not in json.dumps(record)
    # without --profile: the one it was trained with, as evaluate and calibrate do (was the default, cpu, whose
    # name, SmolLM2, every record then gave to the encoder)
    encoder = load_settings("encoder").model.base_model
    assert main(["classify", "--model", str(folder), "Sales rose 5 %."]) == 0
    record = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert (record["model"]["profile"], record["model"]["name"]) == ("encoder", encoder)
    assert main(["classify", "--profile", "cpu", "--model", str(folder), "Sales rose 5 %."]) == 0
    record = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert (record["model"]["profile"], record["model"]["name"]) == ("encoder", encoder)  # named by its card
