"""The `fintune` command line: --help everywhere, tables on success, one error line and exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fintune.cli import app, main


def run_cli(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def test_every_command_has_help(capfd: pytest.CaptureFixture[str]) -> None:
    names = [command.name for command in app.registered_commands]
    assert {"data", "baselines"} <= set(names)
    for name in names:
        code, out, _ = run_cli(capfd, name, "--help")
        assert code == 0 and "Usage" in out, name


HEAVY_STACKS = ("torch", "transformers", "presidio_analyzer", "spacy", "sklearn", "matplotlib", "bitsandbytes",
                "peft", "trl", "ray")


def test_help_imports_no_heavy_stack() -> None:
    """`--help` of the CLI and of every command loads none of the multi-second stacks (it took 9 s when it did)
    and, in an 80-column terminal, cuts no text short (rich's "…" once hid train's --teacher default)."""
    code = (
        "import sys\n"
        "from fintune.cli import app, main\n"
        "for args in [['--help']] + [[c.name, '--help'] for c in app.registered_commands]:\n"
        "    assert main(args) == 0, args\n"
        f"print('loaded:', *sorted(name for name in {HEAVY_STACKS!r} if name in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "COLUMNS": "80"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "loaded:"
    assert "Usage: fintune train" in run.stdout and "\u2026" not in run.stdout


def test_data_prints_counts_per_subset(capfd: pytest.CaptureFixture[str], tiny_data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tiny_data_dir))
    code, out, _ = run_cli(capfd, "data")
    assert code == 0
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line.startswith("│") and "agree" in line}
    assert set(rows) == {"50agree", "66agree", "75agree", "allagree"}
    # sentences, negative, neutral, positive, train/val/test: the fixture's 61 unique sentences
    assert [cell for cell in rows["50agree"] if cell != "│"][:5] == ["61", "20", "21", "20", "48/6/7"]


def test_baselines_writes_comparison(capfd: pytest.CaptureFixture[str], tiny_data_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("FINTUNE_BASELINES__LATENCY_SAMPLES", "10")
    monkeypatch.setenv("FINTUNE_BASELINES__RANDOM_FOREST_TREES", "10")
    code, out, _ = run_cli(capfd, "baselines", "--subset", "50agree", "--output-dir", str(tmp_path))
    assert code == 0
    assert set(json.loads((tmp_path / "comparison.json").read_text())["models"]) == {
        "logistic_regression", "random_forest", "linear_svc"}
    assert "linear_svc" in out and "macro-F1" in out


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["baselines", "--subset", "90agree"], {}, "unknown subset '90agree'"),
        # an empty --subset (an unset shell variable) is refused by every command, not read as the default
        (["baselines", "--subset", ""], {}, "unknown subset ''"),
        (["train", "--subset", "", "--max-steps", "1"], {}, "unknown subset ''"),
        (["evaluate", "--model", "/nonexistent/model", "--subset", ""], {}, "unknown subset ''"),
        (["guard-eval", "--subset", ""], {}, "unknown subset ''"),
        (["data", "--subset", ""], {}, "unknown subset ''"),
        (["data"], {"FINTUNE_DATA_DIR": "/nonexistent/phrasebank"}, "does not exist"),
        (["data", "--profile", "nope"], {}, "unknown profile 'nope'"),
        (["settings", "--list"], {"FINTUNE_CONFIG_DIR": "/"}, "no profiles (*.yaml) in /"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                          args: list[str], env: dict[str, str], message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, _, err = run_cli(capfd, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("error:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--epochs", "3"], "No such option"),
        (["evaluate"], "Missing option"),
        (["train", "--max-steps", "many"], "Invalid value"),
        (["train", "--max-steps", "0"], "Invalid value for '--max-steps'"),  # ran one step before
        (["serve", "--workers", "0"], "Invalid value for '--workers'"),
        (["nosuchcommand"], "No such command"),
        (["settings", "--list", "--profile", "cpu"], "drop --profile"),  # not silently ignored
        (["serve", "--port", "0"], "Invalid value for '--port'"),  # a URL nobody can reach
    ],
)
def test_usage_errors_are_typer_messages_not_tracebacks(capfd: pytest.CaptureFixture[str], args: list[str],
                                                        message: str) -> None:
    code, _, err = run_cli(capfd, *args)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_malformed_line_through_the_installed_command(tmp_path: Path) -> None:
    (tmp_path / "Sentences_50Agree.txt").write_text("Profit rose .@positive\nthis line has no label\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "fintune"), "baselines"], capture_output=True, text=True,
        env={"FINTUNE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, check=False,
    )
    assert result.returncode == 2
    assert "line 2: expected 'sentence@label'" in result.stderr and "Traceback" not in result.stderr


def test_settings_shows_profiles_and_env_overrides(capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(capfd, "settings", "--list")
    assert code == 0 and "cpu" in out and "mistral-7b" in out
    monkeypatch.setenv("FINTUNE_MONITORING__DRIFT_THRESHOLD", "0.25")
    code, out, _ = run_cli(capfd, "settings", "--profile", "cpu")
    assert code == 0 and "drift_threshold: 0.25" in out and "profile: cpu" in out


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({"FINTUNE_BASELINES__MODELS": "[]"}, ["baselines"], "at least 1 item"),
    ({"FINTUNE_DATA__TEST_FRACTION": "0.01"}, ["baselines"], "cannot be split 0.1 / 0.01 with every label"),
    ({"FINTUNE_BASELINES__MIN_DF": "5000"}, ["baselines"], "cannot be fitted with these baselines settings"),
    ({}, ["baselines", "--output-dir", "FILE"], "is a file, not a folder"),
    ({}, ["train", "--profile", "tiny-mistral", "--output-dir", "FILE"], "is a file, not a folder"),
    ({}, ["lora-report", "--profile", "tiny-mistral", "--output", "DIR"], "is a folder, not a file"),
    ({}, ["guard-eval", "--output", "DIR"], "is a folder, not a file"),
    ({}, ["lora-report", "--profile", "tiny-mistral", "--output", "FILE/report.json"], "cannot be written"),
    ({}, ["classify", "--output", "/proc/fintune-none/out.jsonl", "Sales rose."], "cannot make the folder"),
], ids=["no baselines", "split too small", "min_df too high", "output is a file", "train into a file",
        "report into a folder", "guard-eval into a folder", "report under a file", "folder that cannot be made"])
def test_bad_settings_and_paths_are_one_error_line(
    capfd: pytest.CaptureFixture[str], tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str], args: list[str], expected: str,
) -> None:
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tiny_data_dir))
    monkeypatch.setenv("FINTUNE_OUTPUT_DIR", str(tmp_path / "out"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    paths = {"FILE": str(tmp_path / "file"), "DIR": str(tmp_path),
             "FILE/report.json": str(tmp_path / "file" / "report.json")}
    code, _, err = run_cli(capfd, *[paths.get(a, a) for a in args])
    assert code == 2 and expected in err and "Traceback" not in err


def test_settings_mask_the_redis_password(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_RELIABILITY__REDIS_URL", "redis://ops:hunter2@redis.internal:6380/1")
    code, out, _ = run_cli(capfd, "settings")
    assert code == 0 and "redis://ops:****@redis.internal:6380/1" in out and "hunter2" not in out


@pytest.mark.parametrize(
    ("args", "shown"),
    [  # rich read these as markup: a MarkupError traceback, and a path missing its "[final]"
        (["data", "--subset", "[/a]"], "error: unknown subset '[/a]'"),
        (["classify", "--input", "/tmp/calls [final].csv"], "error: input file /tmp/calls [final].csv does not exist"),
    ],
)
def test_an_error_line_shows_the_value_exactly_as_given(
    capfd: pytest.CaptureFixture[str], args: list[str], shown: str
) -> None:
    code, _, err = run_cli(capfd, *args)
    assert code == 2 and shown in err and "Traceback" not in err


def test_settings_print_values_as_they_are(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_DATA_DIR", "/data/:cat:/[old]/x")  # was printed as "/data/🐱//x"
    code, out, _ = run_cli(capfd, "settings")
    assert code == 0 and "data_dir: /data/:cat:/[old]/x" in out
