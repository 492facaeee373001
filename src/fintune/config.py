"""FinTune's configuration: one typed pydantic model, named YAML profiles, `FINTUNE_*` environment overrides.

This module owns every knob of the project. Each concern reads its own section (``settings.data``,
``settings.guardrails`` ...); no other module defines settings as constants.

Precedence, highest first:

1. environment variables: ``FINTUNE_<FIELD>`` for top-level fields (``FINTUNE_DATA_DIR``) and
   ``FINTUNE_<SECTION>__<FIELD>`` for nested ones (``FINTUNE_MONITORING__DRIFT_THRESHOLD=0.2``);
2. the profile's YAML file, ``configs/<profile>.yaml`` (or any path to a ``.yaml`` file);
3. the defaults documented on the fields below.

``load_settings("cpu")`` is the one entry point; ``FINTUNE_PROFILE`` picks the profile when none is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fintune.errors import ConfigError

PROJECT_ROOT: Path = Path(__file__).resolve().parents[2]
"""The repository root (this file lives in ``src/fintune/``)."""

DEFAULT_PROFILE = "cpu"
SubsetName = Literal["50agree", "66agree", "75agree", "allagree"]


class Section(BaseModel):
    """Base of every settings section: unknown keys are an error, so a typo in a profile cannot pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(Section):
    """Where Financial PhraseBank comes from and how it is split."""

    subset: SubsetName = Field("50agree", description="Agreement level used when a command is not told one.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of sentences in the validation split.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of sentences in the test split.")
    split_seed: int = Field(42, description="Seed of the stratified train/validation/test split.")
    hub_repo_id: str = Field(
        "takala/financial_phrasebank", description="Hugging Face dataset repo used when no local copy exists."
    )
    hub_filename: str = Field(
        "data/FinancialPhraseBank-v1.0.zip", description="The original release's zip inside that repo."
    )
    allow_download: bool = Field(True, description="Try the hub when no local copy is found.")

    @model_validator(mode="after")
    def _fractions_leave_a_training_set(self) -> DataSettings:
        if self.validation_fraction + self.test_fraction >= 0.8:
            raise ValueError("validation_fraction + test_fraction must leave at least 20 % for training")
        return self


class BaselineSettings(Section):
    """TF-IDF baselines: the floor every fine-tuned model must beat."""

    models: list[Literal["logistic_regression", "random_forest", "linear_svc"]] = Field(
        default_factory=lambda: ["logistic_regression", "random_forest", "linear_svc"],
        description="Which baselines to train, in report order.",
    )
    ngram_max: int = Field(2, ge=1, le=3, description="TF-IDF word n-grams from 1 to this length.")
    min_df: int = Field(1, ge=1, description="Ignore n-grams seen in fewer training sentences than this.")
    sublinear_tf: bool = Field(True, description="Use 1 + log(tf) instead of raw term frequency.")
    class_weight: Literal["balanced"] | None = Field(
        None, description="'balanced' reweights classes by inverse frequency (helps macro-F1, costs accuracy)."
    )
    random_forest_trees: int = Field(200, ge=10, description="Number of trees in the random forest.")
    latency_samples: int = Field(200, ge=10, description="Single-sentence predictions timed for p50/p95.")
    random_state: int = Field(42, description="Seed for the models that use randomness.")


class LoraSettings(Section):
    """LoRA adapter shape (peft)."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Linear layers that get adapters: the attention projections.",
    )


class QuantizationSettings(Section):
    """4-bit base model (bitsandbytes)."""

    load_in_4bit: bool = Field(True, description="Quantize the base model's linear layers to 4 bits.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: NormalFloat4 or FP4.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (about 0.4 bit/param).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the de-quantized weights are computed in."
    )


class ModelSettings(Section):
    """The model to fine-tune and how (the fine-tuning issue extends this section)."""

    backend: Literal["qlora", "encoder"] = Field("qlora", description="QLoRA causal LM or the encoder fallback.")
    base_model: str = Field("HuggingFaceTB/SmolLM2-135M-Instruct", description="Hub id or local path of the base.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)


class GuardrailSettings(Section):
    """PII detection and masking (Presidio) and the output checks (the guardrails issue extends this section)."""

    spacy_model: str = Field("en_core_web_sm", description="spaCy pipeline Presidio uses for NER and tokens.")
    low_confidence_threshold: float = Field(
        0.6, ge=0, le=1, description="A prediction whose top probability is below this is flagged low_confidence."
    )


class ReliabilitySettings(Section):
    """Circuit breaker and automatic recovery (the reliability issue extends this section)."""

    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    recovery_timeout_s: float = Field(30.0, gt=0, description="Seconds the breaker stays OPEN before a trial.")
    half_open_max_calls: int = Field(1, ge=1, description="Trial calls let through while HALF_OPEN.")


class MonitoringSettings(Section):
    """Request metrics, health score and drift detection (the monitoring issue extends this section)."""

    drift_threshold: float = Field(0.15, gt=0, description="KL divergence above which predictions have drifted.")
    drift_min_samples: int = Field(100, ge=1, description="Predictions needed in the window before judging drift.")


class ServingSettings(Section):
    """HTTP service (the serving issue extends this section)."""

    host: str = Field("127.0.0.1", description="Interface uvicorn binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port uvicorn listens on.")


class Settings(BaseSettings):
    """Everything FinTune can be told, as one profile. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="FINTUNE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    profile: str = Field(DEFAULT_PROFILE, description="Name of the profile these settings came from.")
    description: str = Field("", description="One line on what the profile is for.")
    seed: int = Field(42, description="Global seed for training and sampling.")
    data_dir: Path | None = Field(
        None,
        description="Folder holding Sentences_*Agree.txt or FinancialPhraseBank-v1.0.zip. None: "
        "../shared/data/financial_phrasebank from the project root when it exists, else the hub.",
    )
    output_dir: Path = Field(PROJECT_ROOT / "outputs", description="Root of every artifact FinTune writes.")
    cache_dir: Path = Field(PROJECT_ROOT / ".cache", description="Downloads and converted model weights.")
    data: DataSettings = Field(default_factory=DataSettings)
    baselines: BaselineSettings = Field(default_factory=BaselineSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    reliability: ReliabilitySettings = Field(default_factory=ReliabilitySettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then the profile's YAML (passed as init values), then field defaults."""
        return env_settings, init_settings


def config_dir() -> Path:
    """The folder holding the profile YAML files (``FINTUNE_CONFIG_DIR`` or ``<project>/configs``)."""
    return Path(os.environ.get("FINTUNE_CONFIG_DIR", PROJECT_ROOT / "configs"))


def available_profiles() -> list[str]:
    """Names of the profiles in :func:`config_dir`, sorted."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def profile_path(profile: str) -> Path:
    """The YAML file of a profile name, or the path itself when given a ``.yaml`` path."""
    if profile.endswith((".yaml", ".yml")):
        path = Path(profile)
    else:
        path = config_dir() / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles()) or "none"
        raise ConfigError(f"unknown profile {profile!r}: no file {path}. Known profiles: {known}.")
    return path


def read_profile(profile: str) -> dict[str, Any]:
    """The raw values of a profile's YAML file, with ``profile`` set to its name."""
    path = profile_path(profile)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"profile {path} must hold a mapping of settings, not {type(values).__name__}")
    values.setdefault("profile", path.stem)
    return values


def load_settings(profile: str | None = None, **overrides: Any) -> Settings:
    """Settings of ``profile`` (default: ``FINTUNE_PROFILE`` or ``cpu``) with env overrides applied.

    ``overrides`` replace top-level fields after loading (the CLI's ``--output-dir`` and the like).
    """
    name = profile or os.environ.get("FINTUNE_PROFILE") or DEFAULT_PROFILE
    values = read_profile(name)
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        raise ConfigError(f"profile {name!r} has invalid settings:\n{_readable(exc)}") from exc
    # FINTUNE_PROFILE is also an env value for the `profile` field: the file actually read wins.
    update = {"profile": values["profile"], **{k: v for k, v in overrides.items() if v is not None}}
    return settings.model_copy(update=update)


def _readable(exc: ValidationError) -> str:
    """One line per invalid field: ``  data.test_fraction: Input should be less than 0.5``."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(profile)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)
