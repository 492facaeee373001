"""The 4-bit base model: bitsandbytes NF4 configuration, quantized loading, decoding for inference, analytic memory.

NF4 (bitsandbytes) stores each linear weight in 4 bits with one absmax constant per 64-weight block; with
double quantization those constants are themselves 8-bit with one fp32 constant per 256 blocks. Embeddings,
norms and the output head stay unquantized in the compute dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from fintune.config import ModelSettings, QuantizationSettings
from fintune.errors import ModelError
from fintune.model.precision import resolve_dtype

BLOCK_SIZE = 64
"""Weights per absmax constant in bitsandbytes' 4-bit formats."""
SECOND_LEVEL_BLOCK = 256
"""Absmax constants per fp32 constant under double quantization."""
UNQUANTIZED_MODULES = ("lm_head",)
"""Linear layers transformers leaves unquantized (the output head)."""


def bnb_config(quant: QuantizationSettings) -> BitsAndBytesConfig | None:
    """The bitsandbytes 4-bit configuration of a profile, or None when it asks for no quantization."""
    if not quant.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(quant.compute_dtype),
    )


def load_base(source: str, model: ModelSettings) -> PreTrainedModel:
    """The base causal LM from a hub id or folder, quantized to 4 bits when the profile says so."""
    quant = model.quantization
    config = bnb_config(quant)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(quant.compute_dtype), "attn_implementation": model.attention}
    if config is not None:
        kwargs["quantization_config"] = config
        kwargs["device_map"] = {"": _device()}
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the base model {source!r}: {exc}. Offline? Use the cpu profile (packaged weights)."
        ) from exc


def _device() -> str:
    """Where the quantized weights live: the GPU when there is one, else the CPU (bitsandbytes >= 0.45)."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class DecodedLinear(nn.Linear):
    """A 4-bit linear layer with its weights decoded once: it multiplies in the weights' dtype and answers in
    its input's dtype, as bitsandbytes' ``Linear4bit`` does after decoding them on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` in the weights' dtype, returned in ``x``'s dtype."""
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def decode_4bit_layers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every bitsandbytes 4-bit linear layer of ``model`` by a :class:`DecodedLinear` holding the weights
    that layer decodes (NF4 values times their block constants) in ``dtype``; every other parameter is kept.

    Call it before the first forward pass: on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights for its
    own kernel at the first evaluation call.
    """
    import bitsandbytes as bnb  # only the QLoRA path gets here; the encoder backend never imports it

    for name, layer in list(model.named_modules()):
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        decoded = DecodedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        decoded.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if layer.bias is not None:
            decoded.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, decoded)
    return model


def analytic_memory(model: nn.Module, quant: QuantizationSettings) -> dict[str, int]:
    """Bytes of the weights in bf16 and in 4 bits + constants (+ unquantized embeddings/head/norms in bf16)."""
    quantized = sum(module.weight.numel() for name, module in _quantizable_linears(model))
    total = sum(p.numel() for p in model.parameters())
    per_param_constants = 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * SECOND_LEVEL_BLOCK) if quant.double_quant else (
        4 / BLOCK_SIZE
    )
    four_bit = quantized * (0.5 + per_param_constants)
    return {
        "quantized_params": quantized,
        "bf16_bytes": total * 2,
        "nf4_bytes": int(round(four_bit + (total - quantized) * 2)),
    }


def _quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers bitsandbytes would quantize (all but the output head)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(UNQUANTIZED_MODULES)
    ]


def upcast_unquantized(model: nn.Module) -> nn.Module:
    """Cast the non-4-bit parameters (embeddings, norms, head) to fp32, as ``prepare_model_for_kbit_training``
    does before training, so a reloaded NF4 model computes exactly what the trained one did."""
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and getattr(param, "quant_state", None) is None:
            param.data = param.data.float()
    return model
