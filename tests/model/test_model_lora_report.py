"""The Mistral-7B LoRA report: exact counts from the architecture on the meta device, no weights needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fintune.config import load_settings
from fintune.model.lora import lora_report
from fintune.model.quantization import analytic_memory


@pytest.fixture(scope="module")
def mistral_report() -> dict:
    """The report of the mistral-7b profile (the architecture is built on the meta device)."""
    return lora_report(load_settings("mistral-7b"))


def test_mistral_7b_r16_on_qkvo_has_exactly_13_631_488_trainable_parameters(mistral_report: dict) -> None:
    # per layer r * (in + out): q 16*(4096+4096) + k,v 16*(4096+1024) each + o 16*(4096+4096), 32 layers
    assert mistral_report["trainable_params"] == 32 * 16 * (8192 + 5120 + 5120 + 8192) == 13_631_488
    assert mistral_report["base_params"] == 7_241_732_096
    assert mistral_report["total_params"] == 7_241_732_096 + 13_631_488
    assert mistral_report["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_the_often_quoted_4m_is_rank_8_on_q_and_v_only(mistral_report: dict) -> None:
    by_choice = {(row["targets"], row["r"]): row["trainable_params"] for row in mistral_report["alternatives"]}
    assert by_choice[("q,v", 8)] == 3_407_872
    assert by_choice[("q,k,v,o", 16)] == mistral_report["trainable_params"]


def test_nf4_weights_are_about_a_quarter_of_bf16(mistral_report: dict) -> None:
    embeddings_and_head = 2 * 32_000 * 4096
    quantized = 7_241_732_096 - embeddings_and_head - 65 * 4096  # minus the 65 RMSNorm weight vectors
    expected = quantized * (0.5 + 1 / 64 + 4 / (64 * 256)) + (7_241_732_096 - quantized) * 2
    assert mistral_report["bf16_bytes"] == 2 * 7_241_732_096
    assert mistral_report["nf4_bytes"] == round(expected)
    assert 0.27 < mistral_report["nf4_bytes"] / mistral_report["bf16_bytes"] < 0.30


def test_without_double_quantization_the_constants_cost_more() -> None:
    from fintune.model.lora import meta_model

    settings = load_settings("mistral-7b")
    base = meta_model(settings)
    single = settings.model.quantization.model_copy(update={"double_quant": False})
    assert analytic_memory(base, single)["nf4_bytes"] > analytic_memory(base, settings.model.quantization)["nf4_bytes"]


def test_the_cpu_report_reads_the_gguf_metadata_without_converting_weights(tmp_path: Path) -> None:
    report = lora_report(load_settings("cpu", cache_dir=tmp_path))
    assert (report["trainable_params"], report["total_params"]) == (1_843_200, 136_358_208)  # lora_report_cpu.json
    assert not (tmp_path / "models").exists()  # no safetensors copy written just to read a config
