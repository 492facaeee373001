"""LoRA adapters (peft): the configuration of a profile and the exact parameter report.

A LoRA adapter on a linear layer ``in -> out`` adds ``r * (in + out)`` trainable weights. The report builds the
base architecture on the meta device (no weights, no memory), wraps it with peft and counts, so the numbers are
the ones training would see; :func:`analytic_lora_params` gives the same count from layer shapes alone for
other ranks and targets.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from fintune.config import LoraSettings, Settings
from fintune.errors import ConfigError
from fintune.model.loading import architecture_config
from fintune.model.quantization import analytic_memory

TARGET_CHOICES: dict[str, list[str]] = {
    "q,v": ["q_proj", "v_proj"],
    "q,k,v,o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
"""Target sets the report compares (attention only, the default, every linear layer of a block)."""


def lora_config(lora: LoraSettings) -> LoraConfig:
    """The peft LoRA configuration of a profile, for a causal LM."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(model: nn.Module, lora: LoraSettings) -> None:
    """Raise :class:`ConfigError` naming the model's linear layers when a LoRA target matches no layer of it."""
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [target for target in lora.target_modules if target not in names]
    if missing:
        linear = sorted({name.split(".")[-1] for name, layer in model.named_modules() if isinstance(layer, nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules {missing} name no layer of {type(model).__name__}; its linear layers are "
            f"{linear} (set FINTUNE_MODEL__LORA__TARGET_MODULES or the profile's model.lora.target_modules)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of a model; 4-bit packed weights are counted as their real sizes."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if hasattr(param, "quant_state") and param.quant_state is not None:
            count = int(param.quant_state.shape.numel())  # packed uint8 holds two 4-bit weights per byte
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def analytic_lora_params(model: nn.Module, targets: list[str], r: int) -> int:
    """``r * (in + out)`` summed over the linear layers whose name ends with a target."""
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets
    )


def meta_model(settings: Settings) -> nn.Module:
    """The base architecture on the meta device: every shape, no weights."""
    config = architecture_config(settings.model, settings.cache_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_report(settings: Settings) -> dict[str, Any]:
    """Exact trainable/total parameters of the profile's adapter, its targets, and bf16 vs NF4 weight bytes."""
    if settings.model.backend != "qlora":
        raise ConfigError(f"profile {settings.profile!r} fine-tunes an {settings.model.backend} without a LoRA "
                          "adapter: lora-report sizes the adapter of a QLoRA profile (cpu, mistral-7b, tiny-mistral)")
    base = meta_model(settings)
    check_targets(base, settings.model.lora)
    memory = analytic_memory(base, settings.model.quantization)
    lora = settings.model.lora
    other_choices = alternatives(base, ranks=(8, 16, 64))  # before peft replaces the target layers
    peft_model: PeftModel = get_peft_model(base, lora_config(lora))
    trainable, total = count_parameters(peft_model)
    return {
        "profile": settings.profile,
        "base_model": settings.model.base_model,
        "architecture": type(base).__name__,
        "target_modules": list(lora.target_modules),
        "r": lora.r,
        "alpha": lora.alpha,
        "trainable_params": trainable,
        "total_params": total,
        "base_params": total - trainable,
        "trainable_percent": round(100 * trainable / total, 4),
        "bf16_bytes": memory["bf16_bytes"],
        "nf4_bytes": memory["nf4_bytes"],
        "adapter_fp32_bytes": trainable * 4,
        "alternatives": other_choices,
    }


def alternatives(base: nn.Module, ranks: tuple[int, ...]) -> list[dict[str, Any]]:
    """Trainable parameters for other ranks and target sets, from layer shapes."""
    return [
        {"r": r, "targets": name, "trainable_params": analytic_lora_params(base, targets, r)}
        for name, targets in TARGET_CHOICES.items()
        for r in ranks
    ]
