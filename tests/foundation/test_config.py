"""Profiles: YAML values, FINTUNE_* overrides, and one readable error for every bad profile."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from fintune.config import Settings, available_profiles, load_settings
from fintune.errors import ConfigError


def test_default_profile_is_cpu_with_documented_defaults() -> None:
    settings = load_settings()
    assert settings.profile == "cpu"
    assert settings.model.lora.r == 16 and settings.model.lora.alpha == 32
    assert settings.model.quantization.quant_type == "nf4" and settings.model.quantization.double_quant
    assert settings.monitoring.drift_threshold == 0.15
    assert settings.reliability.failure_threshold == 5


def undescribed_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields, at any depth, that carry no description."""
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            missing.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += undescribed_fields(field.annotation, f"{prefix}{name}.")
    return missing


def test_every_setting_and_section_is_described() -> None:
    assert len(Settings.model_fields) > 10
    assert undescribed_fields(Settings) == []  # every knob, sections included, says what it does


def test_every_shipped_profile_loads() -> None:
    profiles = available_profiles()
    assert {"cpu", "tiny-mistral", "mistral-7b"} <= set(profiles)
    for name in profiles:
        assert load_settings(name).profile == name


def test_environment_overrides_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINTUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FINTUNE_MONITORING__DRIFT_THRESHOLD", "0.3")
    monkeypatch.setenv("FINTUNE_DATA__SUBSET", "allagree")
    settings = load_settings("cpu")
    assert settings.data_dir == tmp_path
    assert settings.monitoring.drift_threshold == 0.3
    assert settings.data.subset == "allagree"


def test_null_in_the_environment_unsets_an_optional_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings("encoder").model.encoder.distill_from == "cpu"
    monkeypatch.setenv("FINTUNE_MODEL__ENCODER__DISTILL_FROM", "null")
    monkeypatch.setenv("FINTUNE_MODEL__GGUF_PACKAGE", "null")
    assert load_settings("encoder").model.encoder.distill_from is None
    assert load_settings("cpu").model.gguf_package is None


def test_an_empty_environment_variable_is_an_error_not_a_silent_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_SERVING__API_KEY", "")  # ${API_KEY} with the secret missing: no open door
    monkeypatch.setenv("FINTUNE_DATA_DIR", "")  # not the current folder
    with pytest.raises(ConfigError, match="FINTUNE_DATA_DIR, FINTUNE_SERVING__API_KEY set but empty"):
        load_settings("cpu")
    monkeypatch.delenv("FINTUNE_SERVING__API_KEY")
    monkeypatch.delenv("FINTUNE_DATA_DIR")
    monkeypatch.setenv("FINTUNE_CONFIG_DIR", "")  # read before any settings: empty means the default folder
    assert load_settings("cpu").profile == "cpu"


def test_fintune_profile_picks_the_profile_and_explicit_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_PROFILE", "tiny-mistral")
    assert load_settings().profile == "tiny-mistral"
    assert load_settings("mistral-7b").profile == "mistral-7b"


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'nope'.*Known profiles: .*cpu"):
        load_settings("nope")


def test_invalid_value_names_the_field(tmp_path: Path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("data:\n  test_fraction: 0.9\n")
    with pytest.raises(ConfigError, match=r"data\.test_fraction"):
        load_settings(str(profile))


def test_misspelt_key_is_an_error_not_ignored(tmp_path: Path) -> None:
    profile = tmp_path / "typo.yaml"
    profile.write_text("monitoring:\n  drift_treshold: 0.2\n")
    with pytest.raises(ConfigError, match=r"monitoring\.drift_treshold"):
        load_settings(str(profile))


def test_profile_that_is_not_a_mapping(tmp_path: Path) -> None:
    profile = tmp_path / "list.yaml"
    profile.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(str(profile))


def test_the_queue_must_hold_the_largest_batch_and_document() -> None:
    from fintune.config import ServingSettings

    ServingSettings(queue_size=1000, max_batch_items=256, max_document_sentences=1000)
    with pytest.raises(ValueError, match="max_document_sentences"):
        ServingSettings(queue_size=256, max_batch_items=256, max_document_sentences=1000)


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("FINTUNE_DATADIR", r"FINTUNE_DATADIR names no setting.*did you mean FINTUNE_DATA_DIR\?"),
        ("FINTUNE_MONITORNG__DRIFT_THRESHOLD", r"did you mean FINTUNE_MONITORING__DRIFT_THRESHOLD\?"),
        ("fintune_serving__portt", r"serving has no field 'portt'; did you mean FINTUNE_SERVING__PORT\?"),
        ("FINTUNE_SERVING__PORT__X", r"serving\.port is a single value, not a section"),
        ("FINTUNE_GUARDRAILS__SCORE_THRESHOLDS__US_SSN",
         r"one key of the mapping guardrails\.score_thresholds.*set FINTUNE_GUARDRAILS__SCORE_THRESHOLDS to the whole"),
    ],
)
def test_a_misspelt_environment_variable_is_an_error_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, message: str
) -> None:
    monkeypatch.setenv(variable, "0.2")
    with pytest.raises(ConfigError, match=message):
        load_settings("cpu")


def test_mapping_keys_and_optional_sections_are_reachable_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "configs"))  # not a setting
    monkeypatch.setenv("FINTUNE_GUARDRAILS__ENTITIES", '["US_SSN", "CREDIT_CARD"]')
    monkeypatch.setenv("FINTUNE_MONITORING__HEALTH_WEIGHTS", '{"latency": 1.0}')  # a section, as JSON
    monkeypatch.setenv("FINTUNE_GUARDRAILS__SCORE_THRESHOLDS", '{"US_SSN": 0.9}')  # a mapping, whole
    monkeypatch.setenv("FINTUNE_SERVING__FAULTS__START_S", "3")  # a field of an optional section
    settings = load_settings("cpu")
    assert settings.guardrails.entities == ["US_SSN", "CREDIT_CARD"]
    assert settings.monitoring.health_weights.latency == 1.0
    assert settings.guardrails.score_thresholds["US_SSN"] == 0.9
    assert settings.serving.faults is not None and settings.serving.faults.start_s == 3


def test_a_list_not_written_as_json_says_how_to_write_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_GUARDRAILS__ENTITIES", "US_SSN,CREDIT_CARD")
    with pytest.raises(ConfigError, match=r"FINTUNE_GUARDRAILS__ENTITIES='US_SSN,CREDIT_CARD'.*written as JSON"):
        load_settings("cpu")


def test_an_invalid_environment_value_names_the_variable_and_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_SERVING__PORT", "abc")
    with pytest.raises(ConfigError, match=r"FINTUNE_\* overrides.*\n  serving\.port: .*") as raised:
        load_settings("cpu")
    assert "(from FINTUNE_SERVING__PORT='abc')" in str(raised.value)


def test_a_section_rule_broken_by_a_variable_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_SERVING__QUEUE_SIZE", "10")  # under max_batch_items: a rule across fields
    with pytest.raises(ConfigError, match=r"FINTUNE_\* overrides") as raised:
        load_settings("cpu")
    assert "queue_size must be at least" in str(raised.value)
    assert "(FINTUNE_SERVING__QUEUE_SIZE set)" in str(raised.value)


@pytest.mark.parametrize("url", ["hooks.example.com/services/S3CRET", "ftp://hooks.example.com/S3CRET", "http:///S3CRET"])
def test_a_webhook_url_urllib_cannot_post_to_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("FINTUNE_MONITORING__DRIFT_WEBHOOK_URL", url)  # failed only at the first drift episode
    with pytest.raises(ConfigError, match="drift_webhook_url must be an http:// or https:// URL") as raised:
        load_settings("cpu")
    assert "S3CRET" not in str(raised.value)


def test_https_webhook_url_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINTUNE_MONITORING__DRIFT_WEBHOOK_URL", "https://hooks.example.com/services/S3CRET")
    url = load_settings("cpu").monitoring.drift_webhook_url
    assert url is not None and url.get_secret_value().endswith("S3CRET")


@pytest.mark.parametrize("edges", ["[0.1, 0.1, 0.5]", "[0, 0.1]", "[0.5, 0.1]", "[]"])
def test_latency_buckets_must_be_strictly_increasing_and_positive(monkeypatch: pytest.MonkeyPatch, edges: str) -> None:
    monkeypatch.setenv("FINTUNE_MONITORING__LATENCY_BUCKETS_S", edges)  # equal edges gave two Prometheus series
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_settings("cpu")


@pytest.mark.parametrize(
    "variables",
    [
        {"FINTUNE_SERVING__API_KEY": "hunter2", "FINTUNE_SERVING__FAULTS": "rate=0.1"},  # a mapping not in JSON
        {"FINTUNE_RELIABILITY__REDIS_URL": "redis://:hunter2@h/0", "FINTUNE_RELIABILITY__COUNTED_EXCEPTIONS": "x"},
        {"FINTUNE_SERVING": '{"api_key": "hunter2", "port": "not a number"}'},  # a whole section as JSON
    ],
)
def test_an_error_about_a_variable_never_shows_a_secret(monkeypatch: pytest.MonkeyPatch, variables: dict) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings("cpu")
    assert "hunter2" not in str(raised.value) and "****" in str(raised.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"seed: 1\nseed: 2\n", "key 'seed' is given twice"),  # the last one used to win
        (b"model:\n  training:\n    epochs: 2\n  training:\n    lora_r: 8\n", "key 'training' is given twice"),
        (b"1: x\n", "key 1 is not text"),  # was TypeError: keywords must be strings
        (b"description: caf\xe9\n", "is not UTF-8 text"),  # was a UnicodeDecodeError traceback
        (b"profile: encoder\n", "a profile's name is its file's name"),  # would use the encoder's model folder
    ],
)
def test_a_profile_file_read_wrongly_before_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    profile = tmp_path / "mine.yaml"
    profile.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(str(profile))


def test_a_profile_may_use_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    profile = tmp_path / "anchored.yaml"  # valid YAML that the duplicate-key check first refused
    profile.write_text("serving:\n  faults:\n    <<: {rate: 0.5, seed: 1}\n    seed: 3\n")
    faults = load_settings(str(profile)).serving.faults
    assert faults is not None and (faults.rate, faults.seed) == (0.5, 3)  # the explicit key wins, as in YAML


def test_a_profile_may_name_itself(tmp_path: Path) -> None:
    profile = tmp_path / "mine.yaml"
    profile.write_text("profile: mine\nseed: 3\n")
    settings = load_settings(str(profile))
    assert settings.profile == "mine" and settings.seed == 3


def test_a_misspelt_profile_key_names_the_closest_setting(tmp_path: Path) -> None:
    profile = tmp_path / "typo.yaml"
    profile.write_text("monitoring:\n  drift_treshold: 0.2\nmodel:\n  trainng: {}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(str(profile))
    assert "monitoring.drift_treshold: Extra inputs are not permitted; did you mean monitoring.drift_threshold?" in (
        str(raised.value))
    assert "did you mean model.training?" in str(raised.value)
