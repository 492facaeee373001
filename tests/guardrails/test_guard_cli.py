"""`fintune guard TEXT`, `fintune guard --jsonl FILE` and `fintune guard-eval`, run in-process through main()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fintune.cli import main


@pytest.fixture(autouse=True)
def _no_log_redaction_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI installs log redaction process-wide; keep it out of the other tests."""
    monkeypatch.setenv("FINTUNE_GUARDRAILS__REDACT_LOGS", "false")


def test_guard_text_prints_one_result(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guard", "Wire EUR 500 to account 0012345678, SSN 536-22-8145."]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["redacted_text"] == "Wire EUR 500 to account <ACCOUNT_NUMBER>, SSN <US_SSN>."
    assert result["pii_types"] == ["ACCOUNT_NUMBER", "US_SSN"] and result["pii_count"] == 2


def test_guard_jsonl_prints_one_result_per_line_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["call 201.555.0123", "Profit rose 12 % to EUR 3.1 mn in Q3 2009.", "mail li.wang@example.org"]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"id": f"r{i}", "text": t}) for i, t in enumerate(texts)) + "\n\n"
                      + json.dumps("SSN 536-22-8145") + "\n")  # after a blank line: line 5, no id of its own
    assert main(["guard", "--jsonl", str(source)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["redacted_text"] for line in lines] == [
        "call <PHONE_NUMBER>", texts[1], "mail <EMAIL_ADDRESS>", "SSN <US_SSN>"
    ]
    assert [json.loads(line)["id"] for line in lines] == ["r0", "r1", "r2", "5"]  # matched to its input line


def test_bad_jsonl_line_names_the_line_not_its_pii(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"txt": "SSN 536-22-8145"}\n')
    assert main(["guard", "--jsonl", str(source)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'text'" in err and "536-22-8145" not in err


def test_guard_reads_a_jsonl_file_as_classify_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a spreadsheet's byte-order mark, a U+2028 inside a JSON string (str.splitlines cut the record there) and a
    # bare JSON string line, which `fintune classify --input` all took and `guard --jsonl` refused
    source = tmp_path / "export.ndjson"
    source.write_bytes("\ufeff".encode() + b'{"text": "SSN 536-22-8145\xe2\x80\xa8next"}\n"mail li.wang@example.org"\n')
    assert main(["guard", "--jsonl", str(source)]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.strip().split("\n")  # the output keeps the U+2028 too
    assert [json.loads(line)["redacted_text"] for line in lines] == ["SSN <US_SSN>\u2028next", "mail <EMAIL_ADDRESS>"]


def test_guard_names_the_line_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(b'{"text": "fine"}\n{"text": "Gew\xfcrz SSN 536-22-8145"}\n')
    assert main(["guard", "--jsonl", str(source)]) == 2
    err = capsys.readouterr().err
    assert "latin1.jsonl:2 is not UTF-8" in err and "536-22-8145" not in err


def test_guard_jsonl_errors_name_the_line_never_pii(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "keys.jsonl"
    source.write_text('{"536-22-8145": "x", "body": "y"}\n', encoding="utf-8")  # a key is content too
    assert main(["guard", "--jsonl", str(source)]) == 2
    err = capsys.readouterr().err
    assert "keys.jsonl:1 has no 'text' field (it has: <a field not shown>, 'body')" in err and "536" not in err
    split = tmp_path / "split.jsonl"  # an SSN cut across keys is not shown piece by piece
    split.write_text('{"536": 1, "22": 2, "8145": 3, "body": "y"}\n', encoding="utf-8")
    assert main(["guard", "--jsonl", str(split)]) == 2
    err = capsys.readouterr().err
    assert "(it has: '536', <a field not shown>, <a field not shown>, 'body')" in err and "8145" not in err
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    assert main(["guard", "--jsonl", str(deep)]) == 2
    assert "deep.jsonl:1 is nested too deeply" in capsys.readouterr().err


def test_guard_jsonl_takes_the_text_column_its_error_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "bodies.jsonl"
    source.write_text('{"body": "call 201.555.0123"}\n', encoding="utf-8")
    assert main(["guard", "--jsonl", str(source)]) == 2
    assert "with --text-column" in capsys.readouterr().err
    assert main(["guard", "--jsonl", str(source), "--text-column", "body"]) == 0
    assert json.loads(capsys.readouterr().out)["redacted_text"] == "call <PHONE_NUMBER>"


def test_guard_needs_exactly_one_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guard"]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_guard_eval_refuses_an_unknown_subset_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["guard-eval", "--subset", "55agree", "--output", str(tmp_path / "new" / "eval.json")]) == 2
    assert "unknown subset '55agree'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # no folder made for a run that never started


@pytest.fixture
def guard_never_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the guard fail the test: what is checked must be checked before that slow step."""
    import fintune.cli.guard_commands as commands

    def no_guard(settings: object) -> None:
        raise AssertionError("the guard loaded before the input was checked")

    monkeypatch.setattr(commands, "_guard", no_guard)


def test_guard_eval_refuses_a_malformed_data_file_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], guard_never_loads: None
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "Sentences_50Agree.txt").write_text("Sales rose .@positive\nno label on this line\n", encoding="latin-1")
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(data))
    output = tmp_path / "eval.json"
    # was exit 0, the file skipped as 'not available', and the latency judged on synthetic texts instead
    assert main(["guard-eval", "--output", str(output)]) == 2
    assert "Sentences_50Agree.txt" in capsys.readouterr().err and not output.exists()


def test_guard_eval_without_data_says_so_and_fails_when_the_subset_was_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], guard_never_loads: None
) -> None:
    import fintune.cli.guard_commands as commands

    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tmp_path))  # an empty folder: no PhraseBank
    settings = commands.load_settings(None)
    assert commands._clean_sentences(settings, "50agree", required=False)["texts"] == []
    assert "warning: no clean PhraseBank sentences" in capsys.readouterr().err  # was silent
    assert main(["guard-eval", "--subset", "50agree", "--output", str(tmp_path / "eval.json")]) == 2
    assert "Financial PhraseBank not found" in capsys.readouterr().err


def test_guard_eval_writes_figures_with_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FINTUNE_GUARDRAILS__EVAL_SAMPLES_PER_TEMPLATE", "2")
    monkeypatch.setenv("FINTUNE_GUARDRAILS__EVAL_LATENCY_SAMPLES", "20")
    monkeypatch.setenv("FINTUNE_GUARDRAILS__EVAL_CLEAN_SENTENCES", "40")
    monkeypatch.setenv("FINTUNE_DATA__SUBSET", "allagree")  # the clean sentences follow the profile's subset
    output = tmp_path / "guardrails.json"
    assert main(["guard-eval", "--compare-defaults", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["provenance"]["command"] and report["provenance"]["machine"]["cores"]
    assert "presidio-analyzer" in report["provenance"]["versions"]
    held_out = report["synthetic_eval"]
    assert held_out["sentences"] == 2 * held_out["templates"]
    assert set(held_out["per_entity"]) == set(report["synthetic_dev"]["per_entity"])
    assert held_out["leak_rate"] == 0 and held_out["min_recall"] == 1.0
    latency = report["latency"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] and latency["sentences"] == 20
    if "clean_phrasebank" in report:  # the shared PhraseBank is present
        assert report["clean_phrasebank"]["sentences"] == 40 and report["data"]["source_sha256"]
        assert report["data"]["subset"] == "allagree"
        assert {"DATE_TIME", "LOCATION", "NRP"} <= set(report["presidio_defaults"]["all_entities"]["entities"])
    else:
        assert "skipped" in report["data"]
    assert set(report["targets"]) >= {"eval_leak_rate_is_0", "batch_faster_per_sentence"}
    baseline = report["presidio_defaults"]["pii_only"]
    assert "ORGANIZATION" not in baseline["entities"]
    assert baseline["synthetic_eval"]["sentences"] == held_out["sentences"]
    assert "written to" in capsys.readouterr().out


def test_an_unreadable_jsonl_file_fails_before_the_guard_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], guard_never_loads: None
) -> None:
    assert main(["guard", "--jsonl", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "blank.jsonl").write_text("\n  \n", encoding="utf-8")
    assert main(["guard", "--jsonl", str(tmp_path / "blank.jsonl")]) == 2  # not a silent exit 0
    assert "blank.jsonl holds no text to guard" in capsys.readouterr().err


def test_guard_reads_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import threading

    pipe = tmp_path / "requests.pipe"  # as /dev/stdin or <(...) are: not a regular file, said not to exist
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=('{"text": "mail li.wang@example.org"}\n',), daemon=True)
    writer.start()
    assert main(["guard", "--jsonl", str(pipe)]) == 0
    writer.join(10)
    assert json.loads(capsys.readouterr().out)["redacted_text"] == "mail <EMAIL_ADDRESS>"
