"""`inference.dtype: auto`: the rule per kind of machine, and the loaded model computing in what it chose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fintune.config import Settings, load_settings
from fintune.data import load_splits
from fintune.model import precision
from fintune.model.precision import DtypeChoice, cpu_choice, cpu_vendor, resolve_dtype


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "vendor", "expected"),
    [
        (True, True, "GenuineIntel", torch.bfloat16),  # Xeon with AMX: bf16 2x faster
        (False, True, "AuthenticAMD", torch.bfloat16),  # EPYC: bf16 3.7x faster
        (False, True, "GenuineIntel", torch.float32),  # Xeon without AMX: fp32 1.6x faster
        (False, True, "", torch.float32),  # vendor unknown: the exact one
        (False, False, "AuthenticAMD", torch.float32),  # no bf16 arithmetic: emulated, slow
    ],
)
def test_cpu_rule_follows_the_measured_machines(amx: bool, avx512_bf16: bool, vendor: str,
                                                expected: torch.dtype) -> None:
    choice = cpu_choice(amx, avx512_bf16, vendor)
    assert choice.dtype == expected
    assert choice.reason


def test_named_dtypes_skip_the_rule_and_auto_is_the_machine_choice() -> None:
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("auto") == precision.choose_dtype().dtype in (torch.float32, torch.bfloat16)


def test_vendor_comes_from_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    monkeypatch.setattr(precision, "_CPUINFO", cpuinfo)
    assert cpu_vendor() == "AuthenticAMD"
    monkeypatch.setattr(precision, "_CPUINFO", tmp_path / "absent")
    assert cpu_vendor() == ""


def test_a_gpu_without_bf16_gets_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    # the one fake: a GPU we do not have
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.choose_dtype.__wrapped__().dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.choose_dtype.__wrapped__().dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("chosen", [torch.float32, torch.bfloat16])
def test_auto_decodes_the_base_in_the_chosen_dtype(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch, chosen: torch.dtype
) -> None:
    from fintune.model.inference import SentimentClassifier
    from fintune.model.quantization import DecodedLinear
    from fintune.model.training import train

    out = train(tiny_settings, max_steps=1, splits=load_splits(tiny_settings)).output_dir
    monkeypatch.setattr(precision, "choose_dtype", lambda: DtypeChoice(chosen, "as this test says"))
    inference = tiny_settings.model.inference.model_copy(update={"dtype": "auto", "dequantize_base": True})
    auto = tiny_settings.model_copy(update={"model": tiny_settings.model.model_copy(update={"inference": inference})})
    classifier = SentimentClassifier.from_pretrained(out, auto, merge=False)
    decoded = [m for m in classifier.model.modules() if isinstance(m, DecodedLinear)]
    assert decoded and {m.weight.dtype for m in decoded} == {chosen}
    probabilities = classifier.predict_proba(["Sales rose .", "Profit fell ."])
    assert probabilities.shape == (2, 3)


def test_bf16_autocast_follows_the_compute_dtype_unless_named() -> None:
    from fintune.config import TrainingSettings
    from fintune.model.training import autocast_bf16

    assert autocast_bf16(TrainingSettings(), torch.bfloat16) is True
    assert autocast_bf16(TrainingSettings(), torch.float32) is False  # no autocast back to an emulated bf16
    assert autocast_bf16(TrainingSettings(bf16=True), torch.float32) is True
    assert autocast_bf16(TrainingSettings(bf16=False), torch.bfloat16) is False


@pytest.mark.slow
def test_auto_compute_dtype_trains_in_what_the_machine_does_fast(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fintune.model.training import train

    monkeypatch.setattr(precision, "choose_dtype", lambda: DtypeChoice(torch.float32, "as this test says"))
    quantization = tiny_settings.model.quantization.model_copy(update={"compute_dtype": "auto"})
    auto = tiny_settings.model_copy(
        update={"model": tiny_settings.model.model_copy(update={"quantization": quantization})})
    result = train(auto, max_steps=1, splits=load_splits(auto))
    assert (result.card["compute_dtype"], result.card["bf16_autocast"]) == ("float32", False)
    from bitsandbytes.nn import Linear4bit

    quantized = [m for m in result.classifier.model.modules() if isinstance(m, Linear4bit)]
    assert quantized and {m.compute_dtype for m in quantized} == {torch.float32}  # what the layers multiply in
    assert load_settings("cpu").model.quantization.compute_dtype == "auto"  # the default profile runs anywhere
