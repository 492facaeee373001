"""The benchmark scripts' pure parts (fault summary, tallies, argument types) and their one-line errors; nothing
is measured, no server started, no model loaded."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fintune import provenance as prov

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the folder is no package); registered so its dataclasses resolve."""
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: its folder first, for benchmarks/_args.py
        sys.path.insert(0, str(BENCHMARKS))
    module_name = f"benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def serving_load() -> ModuleType:
    """benchmarks/serving_load.py."""
    return load_script("serving_load")


BREAKER = {"name": "model", "state": "closed", "transitions": {"closed->open": 1, "open->half_open": 1,
                                                               "half_open->closed": 1}}
FAULTS = {"rate": 0.5, "start_s": 10.0, "stop_s": 25.0, "seed": 7}


def snapshot(faults: dict[str, Any] | None, breaker: dict[str, Any] = BREAKER) -> dict[str, Any]:
    """A /metrics/json body with the parts the fault summary reads."""
    return {"serving": {"breaker": breaker, "faults": faults}, "errors": {"total": 0}, "fallbacks": {}}


def fault_result(transitions: list[tuple[float, int]]) -> dict[str, Any]:
    """What fault_load returns (its first half)."""
    return {"tally": {"lost": 0, "answered": 100}, "readyz_transitions": transitions}


# ---- serving_load: the fault run -------------------------------------------------------------------------------
def test_healthy_after_is_timed_from_the_last_injected_fault(serving_load: ModuleType) -> None:
    # the breaker opened at 11.9 s and made no model calls after: the last fault came at 50 - 30 = 20 s
    transitions = [(0.2, 200), (11.9, 503), (41.9, 200)]
    summary = serving_load.summarise_faults(fault_result(transitions), snapshot({"injected": 9,
                                            "last_fault_age_s": 30.0}), 50.0, 2.0, 30.0, FAULTS)
    assert summary["last_fault_s"] == 20.0
    assert summary["healthy_after_last_fault_s"] == 21.9
    assert summary["healthy_after_fault_window_s"] == 18.9  # from the window's end: 25 - 2 s after the load began
    assert summary["healthy_within_recovery_timeout"] is True
    assert summary["seconds_past_recovery_timeout"] == -8.1
    assert summary["faults_injected"] == 9 and summary["load_offset_s"] == 2.0
    assert summary["breaker_opened"] is True and summary["breaker_openings"] == 1
    assert summary["faults"] == FAULTS and "tally" in summary


def test_recovered_before_the_last_fault_counts_as_healthy_at_once(serving_load: ModuleType) -> None:
    # /readyz was 200 again at 12 s, and stayed so through the last fault at 35 - 20 = 15 s
    transitions = [(0.2, 200), (5.0, 503), (12.0, 200)]
    summary = serving_load.summarise_faults(fault_result(transitions), snapshot({"injected": 3,
                                            "last_fault_age_s": 20.0}), 35.0, 1.0, 30.0, FAULTS)
    assert summary["last_fault_s"] == 15.0
    assert summary["healthy_after_last_fault_s"] == 0.0
    assert summary["healthy_after_fault_window_s"] == 0.0
    assert summary["healthy_within_recovery_timeout"] is True


def test_the_breakers_own_wait_and_its_trial_call_count_as_within_the_timeout(serving_load: ModuleType) -> None:
    # opened by the last fault at 11.4 s; the trial call after the 30 s timeout closed it, /readyz 200 at 41.6 s
    transitions = [(0.1, 200), (11.5, 503), (41.6, 200)]
    seen = snapshot({"injected": 10, "last_fault_age_s": 48.6})  # read at 60 s
    within = serving_load.summarise_faults(fault_result(transitions), seen, 60.0, 0.0, 30.0, FAULTS, 1.0)
    strict = serving_load.summarise_faults(fault_result(transitions), seen, 60.0, 0.0, 30.0, FAULTS, 0.0)
    assert within["healthy_after_last_fault_s"] == 30.2 and within["seconds_past_recovery_timeout"] == 0.2
    assert within["healthy_within_recovery_timeout"] is True and within["trial_slack_s"] == 1.0
    assert strict["healthy_within_recovery_timeout"] is False


def test_never_healthy_again_is_none_and_not_within_the_timeout(serving_load: ModuleType) -> None:
    transitions = [(0.2, 200), (11.9, 503)]
    summary = serving_load.summarise_faults(fault_result(transitions), snapshot({"injected": 9,
                                            "last_fault_age_s": 30.0}), 50.0, 2.0, 30.0, FAULTS)
    assert summary["healthy_after_last_fault_s"] is None
    assert summary["healthy_within_recovery_timeout"] is False


def test_a_readyz_blip_without_an_open_breaker_is_no_opening(serving_load: ModuleType) -> None:
    # a transport error (code 0) on /readyz, faults off: no fault to time from, the breaker never opened
    closed = {"name": "model", "state": "closed", "transitions": {}}
    summary = serving_load.summarise_faults(fault_result([(0.2, 200), (3.0, 0), (3.5, 200)]),
                                            snapshot(None, closed), 40.0, 1.0, 30.0, FAULTS)
    assert summary["breaker_opened"] is False and summary["breaker_openings"] == 0
    assert summary["last_fault_s"] is None and summary["faults_injected"] is None
    assert summary["healthy_after_last_fault_s"] is None
    assert summary["healthy_within_recovery_timeout"] is None


def test_injection_on_but_no_fault_yet_gives_no_last_fault(serving_load: ModuleType) -> None:
    assert serving_load.last_fault_at(snapshot({"injected": 0, "last_fault_age_s": None}), 40.0) is None
    assert serving_load.last_fault_at(snapshot({"injected": 1, "last_fault_age_s": 0.5}), 40.0) == 39.5


@pytest.mark.slow
def test_the_servers_get_the_fintune_variables_the_provenance_records(
    serving_load: ModuleType, tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    monkeypatch.setattr(serving_load, "LOG_DIR", tmp_path / "logs")
    for name, value in {"DATA_DIR": tiny_data_dir, "OUTPUT_DIR": tmp_path / "out", "CACHE_DIR": tmp_path / "cache",
                        "RELIABILITY__RECOVERY_TIMEOUT_S": 7}.items():
        monkeypatch.setenv(f"FINTUNE_{name}", str(value))
    recorded = prov.provenance("pytest", packages=("fintune",))["environment"]
    with serving_load.service("tiny-mistral", "env-check") as url:  # a real `fintune serve`
        served = httpx.get(url + "/metrics/json", timeout=10).json()["serving"]["breaker"]["recovery_timeout_s"]
    # the servers were started without them: the file said one thing and the figures came from another
    assert recorded["FINTUNE_RELIABILITY__RECOVERY_TIMEOUT_S"] == "7" and served == 7.0


# ---- serving_load: the load levels -----------------------------------------------------------------------------
def test_tally_summary_reports_percentiles_of_the_answers(serving_load: ModuleType) -> None:
    tally = serving_load.Tally(latencies_s=[0.1, 0.2, 0.3])
    tally.statuses.update({"200": 2, "503": 1})
    tally.degraded, tally.lost = 1, 1
    summary = tally.summary(2.0)
    assert summary["p50_ms"] == 200.0 and summary["p99_ms"] == pytest.approx(298.0)
    assert summary["answered"] == 3 and summary["requests"] == 4 and summary["throughput_rps"] == 1.5
    assert summary["statuses"] == {"200": 2, "503": 1} and summary["degraded"] == 1


def test_tally_summary_without_answers_has_no_percentiles(serving_load: ModuleType) -> None:
    tally = serving_load.Tally(lost=5)
    tally.lost_reasons["ConnectError"] = 5
    summary = tally.summary(1.0)
    assert summary["p50_ms"] is None and summary["p95_ms"] is None and summary["p99_ms"] is None
    assert summary["answered"] == 0 and summary["lost"] == 5 and summary["throughput_rps"] == 0.0


def test_guard_share_is_the_guards_part_of_the_batch_time(serving_load: ModuleType) -> None:
    before = {"guard_s": 1.0, "model_s": 2.0, "checks_s": 0.5}
    after = {"guard_s": 2.0, "model_s": 5.0, "checks_s": 1.0}
    assert serving_load.guard_share(before, after) == round(1.0 / 4.5, 4)
    assert serving_load.guard_share(before, before) == 0.0  # no batch in between


def test_batching_gain_compares_throughput_and_p99(serving_load: ModuleType) -> None:
    batched = {"levels": [{"clients": 1, "throughput_rps": 5.0, "p99_ms": 300.0},
                          {"clients": 32, "throughput_rps": 40.0, "p99_ms": 500.0}]}
    unbatched = {"levels": [{"clients": 32, "throughput_rps": 10.0, "p99_ms": 900.0}]}
    gain = serving_load.batching_gain(batched, unbatched, 32)
    assert gain == {"clients": 32, "throughput_ratio": 4.0, "p99_ms_batched": 500.0, "p99_ms_batch_size_1": 900.0,
                    "lower_p99": True}
    nothing = {"levels": [{"clients": 32, "throughput_rps": 0.0, "p99_ms": None}]}
    gain = serving_load.batching_gain(batched, nothing, 32)
    assert gain["throughput_ratio"] is None and gain["lower_p99"] is None


# ---- the argument types of every script ------------------------------------------------------------------------
def test_positive_int_takes_whole_numbers_above_zero() -> None:
    positive_int = load_script("_args").positive_int
    assert positive_int("3") == 3
    for bad in ("0", "-2", "1.5", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)


def test_seconds_types_tell_positive_from_zero() -> None:
    args = load_script("_args")
    assert args.positive_float("2.5") == 2.5
    assert args.non_negative_float("0") == 0.0  # --fault-seconds 0: skip the fault run
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            args.positive_float(bad)
    for bad in ("-0.5", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            args.non_negative_float(bad)


def test_the_parsers_refuse_a_zero_count(serving_load: ModuleType) -> None:
    with pytest.raises(SystemExit):
        serving_load.build_parser().parse_args(["--levels", "0"])
    with pytest.raises(SystemExit):
        load_script("breaker_overhead").build_parser().parse_args(["--trials", "0"])
    assert serving_load.build_parser().parse_args(["--fault-seconds", "0"]).fault_seconds == 0.0


# ---- ray_classify and model_inference --------------------------------------------------------------------------
def test_ray_tally_compares_labelled_records_only() -> None:
    tally = load_script("ray_classify").tally
    model = {"name": "m", "profile": "cpu", "version": "trained-x"}
    records = [{"label": "positive", "degraded": False, "model": model, "error": None},
               {"label": "neutral", "degraded": True, "model": model, "error": None},
               {"error": {"type": "InvalidInputError"}},
               {"error": {"type": "InvalidInputError"}}]
    figures = tally(records, ["positive", "positive", None, "neutral"])
    assert figures["errors"] == 2 and figures["degraded"] == 1 and figures["labelled"] == 2
    assert figures["labels_compared"] == 2  # the error against an error is no agreement
    assert figures["labels_equal_local"] == 1
    assert figures["models"] == [model]


def test_model_inference_output_names_another_subset() -> None:
    default_output = load_script("model_inference").default_output
    assert default_output("cpu", "50agree", "50agree").name == "model_inference_cpu.json"
    assert default_output("cpu", "allagree", "50agree").name == "model_inference_cpu_allagree.json"


# ---- provenance ------------------------------------------------------------------------------------------------
def test_provenance_records_overrides_with_secrets_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_SEED", "7")
    monkeypatch.setenv("FINTUNE_SERVING__API_KEY", "hunter2")
    monkeypatch.setenv("FINTUNE_RELIABILITY__REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    record = prov.provenance("pytest", packages=("fintune",))
    assert record["environment"]["FINTUNE_SEED"] == "7"
    assert record["environment"]["FINTUNE_SERVING__API_KEY"] == "****"
    assert record["environment"]["FINTUNE_RELIABILITY__REDIS_URL"] == "redis://:****@127.0.0.1:6379/0"
    assert "hunter2" not in str(record) and "s3cret" not in str(record)
    assert record["thread_variables"]["OMP_NUM_THREADS"] == "1" and "MKL_NUM_THREADS" not in record["thread_variables"]
    assert {"command", "date", "machine", "versions", "revision"} <= record.keys()


@pytest.mark.parametrize("key", ["FINTUNE_X_TOKEN", "FINTUNE_DB_PASSWORD", "FINTUNE_HF_SECRET", "fintune_api_key"])
def test_secret_names_are_masked(key: str) -> None:
    assert prov.fintune_environment({key: "plain", "HOME": "/root"}) == {key: "****"}


def test_every_secret_setting_is_masked_in_a_result_file() -> None:
    from pydantic import BaseModel, SecretStr

    from fintune.config import Settings

    def secret_variables(model: type[BaseModel], prefix: str) -> list[str]:
        """The FINTUNE_* names of the SecretStr fields of ``model`` and its sections."""
        names = []
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                names += secret_variables(kind, f"{prefix}{name.upper()}__")
            elif SecretStr in getattr(kind, "__args__", (kind,)):
                names.append(f"{prefix}{name.upper()}")
        return names

    secrets = secret_variables(Settings, "FINTUNE_")
    assert {"FINTUNE_SERVING__API_KEY", "FINTUNE_MONITORING__DRIFT_WEBHOOK_URL"} <= set(secrets)
    for name in secrets:
        assert prov.masked(name, "https://hooks.example.com/services/T0/XXXXSECRET") == "****", name


def test_urls_without_a_password_are_kept() -> None:
    assert prov.mask_url_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert prov.mask_url_password("redis://user:pw@host/0") == "redis://user:****@host/0"
    assert prov.mask_url_password("redis://:pw@[::1") == "****"  # unparsable: wholly masked, it may hide one
    assert prov.mask_url_password("not a url") == "not a url"


@pytest.mark.parametrize(
    ("url", "shown"),
    [  # redis-py reads a password from the query too; before, only the user part was masked
        ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=****"),
        ("unix:///run/redis.sock?db=1&password=hunter2", "unix:///run/redis.sock?db=1&password=****"),
        ("rediss://:hunter2@h/0?ssl_password=hunter2&socket_timeout=1",
         "rediss://:****@h/0?ssl_password=****&socket_timeout=1"),
        ("redis://h/0?db=1&flag", "redis://h/0?db=1&flag"),
    ],
)
def test_a_password_in_the_query_is_masked(url: str, shown: str) -> None:
    assert prov.mask_url_password(url) == shown
    assert prov.masked("FINTUNE_RELIABILITY__REDIS_URL", url) == shown


def test_a_section_set_as_json_has_its_secret_fields_masked() -> None:
    value = '{"api_key": "hunter2", "port": 9000, "faults": {"rate": 0.1}, "x": ["redis://:hunter2@h/0"]}'
    shown = json.loads(prov.masked("FINTUNE_SERVING", value))
    assert shown == {"api_key": "****", "port": 9000, "faults": {"rate": 0.1}, "x": ["redis://:****@h/0"]}
    assert prov.masked("FINTUNE_SEED", "7") == "7" and prov.masked("FINTUNE_X", "[1, 2]") == "[1, 2]"


def test_revision_of_a_git_repository(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        """git in tmp_path, as a user of its own; its stripped output."""
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com",
                               *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    (tmp_path / "a.txt").write_text("one\n", encoding="utf-8")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    assert prov.revision(tmp_path) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "a.txt").write_text("two\n", encoding="utf-8")
    assert prov.revision(tmp_path)["dirty"] is True


def test_revision_is_none_outside_a_repository_or_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path either
    assert prov.revision(tmp_path) is None

    def no_git(*args: Any, **kwargs: Any) -> None:
        """What subprocess.run does where git is not installed."""
        raise FileNotFoundError("git")

    monkeypatch.setattr(prov.subprocess, "run", no_git)
    assert prov.revision() is None
    assert prov.provenance("pytest", packages=())["revision"] is None


def test_command_line_keeps_a_scripts_path_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmarks/serving_load.py", "--seconds", "5"])
    assert prov.command_line(keep_path=True) == "python benchmarks/serving_load.py --seconds 5"
    assert prov.command_line() == "serving_load.py --seconds 5"  # the CLI's form: the program's name


def test_plot_only_refuses_a_fault_only_result(serving_load: ModuleType, tmp_path: Path) -> None:
    faults_only = BENCHMARKS / "results" / "serving_faults_cpu_epyc_avx2_2026-12-03.json"
    from fintune.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no load levels .*nothing to plot"):  # drew two empty axes, exit 0
        serving_load.read_result(faults_only)


# ---- one readable line for a configuration error ---------------------------------------------------------------
@pytest.mark.parametrize("args", [["model_inference.py", "--model", "/nonexistent"],
                                  ["serving_load.py", "--plot-only", "/nonexistent.json"]])
def test_a_configuration_error_is_one_line_and_exit_code_2(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTUNE_")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / args[0]), *args[1:]], capture_output=True, text=True,
                          env=env, cwd=BENCHMARKS.parent, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert any(line.startswith("error: ") and "nonexistent" in line for line in done.stderr.splitlines())
