"""Padding-free ("packed") batches: several sentences in one sequence whose attention stays within each sentence.

A padded batch multiplies every weight matrix by its padding too, and the service's micro-batches mix short and
long sentences. Packing concatenates a batch's token ids into one row, restarts the position ids at each
sentence, and computes attention sentence by sentence (:func:`packed_attention`, registered with transformers'
``AttentionInterface`` as :data:`PACKED_ATTENTION`). Every other layer is token-wise, so it runs once over the
real tokens only, in one large matrix product. A sentence's scores are those it gets alone, up to float rounding.

The attention function reads the sentence boundaries from the forward's ``segment_bounds`` or, failing that,
from where the position ids restart (so a padding-free batch from elsewhere, such as TRL's, is never attended
across); it falls back to transformers' SDPA for a call with a padding mask or a KV cache, so a model switched to
it still scores padded batches and generates correctly. Mistral's sliding window is applied inside a sentence
longer than the window. This is the varlen idea of flash-attention and vLLM, done with
PyTorch's own ``scaled_dot_product_attention`` so that it runs on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ATTENTION = "fintune_packed"
"""The name under which :func:`packed_attention` is registered with transformers."""

BOUNDS_KWARG = "segment_bounds"
"""The forward keyword that carries a packed row's sentence boundaries down to the attention function."""


@dataclass(frozen=True)
class PackedBatch:
    """Model inputs of several sentences packed into one row, and where each sentence ends."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    bounds: list[int]

    @classmethod
    def of(cls, sequences: Sequence[Sequence[int]]) -> PackedBatch:
        """Pack token id lists, in order, into one row of shape (1, total tokens)."""
        if not sequences or any(not ids for ids in sequences):
            raise ValueError("packing needs at least one sequence and no empty one")
        bounds = [0]
        for ids in sequences:
            bounds.append(bounds[-1] + len(ids))
        input_ids = torch.tensor([token for ids in sequences for token in ids]).unsqueeze(0)
        position_ids = torch.cat([torch.arange(len(ids)) for ids in sequences]).unsqueeze(0)
        return cls(input_ids, position_ids, bounds)

    @property
    def last_positions(self) -> torch.Tensor:
        """The index of each sentence's last token in the packed row (its answer position)."""
        return torch.tensor(self.bounds[1:]) - 1

    def model_inputs(self, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of a forward pass over this row (no attention mask: nothing is padded)."""
        return {
            "input_ids": self.input_ids.to(device),
            "position_ids": self.position_ids.to(device),
            BOUNDS_KWARG: self.bounds,
        }


def pack_groups(lengths: Sequence[int], max_sentences: int, max_tokens: int) -> Iterator[list[int]]:
    """Indices in input order, cut into groups of at most ``max_sentences`` sentences and ``max_tokens`` tokens
    (a sentence longer than ``max_tokens`` gets a group of its own)."""
    group: list[int] = []
    tokens = 0
    for index, length in enumerate(lengths):
        if group and (len(group) >= max_sentences or tokens + length > max_tokens):
            yield group
            group, tokens = [], 0
        group.append(index)
        tokens += length
    if group:
        yield group


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of an unpadded row (from the segment bounds, else from where the
    position ids restart); transformers' SDPA for a call with a padding mask or a KV cache."""
    bounds = kwargs.pop(BOUNDS_KWARG, None)
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        if bounds is not None:
            raise ValueError("a packed row takes no padding mask and no KV cache")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if bounds is None:
        bounds = bounds_from_positions(kwargs.get("position_ids"), query.shape[0], query.shape[2])
    window = kwargs.get("sliding_window")
    outputs = [
        _causal(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scaling, window, dropout)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def bounds_from_positions(position_ids: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Where each sequence of an unpadded row starts and ends, read from its position ids (a position that does
    not follow the one before starts a new sequence, as TRL's padding-free batches have it); ValueError for
    several packed rows in one batch, whose sequences would not line up."""
    if position_ids is None:
        return [0, length]
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not restarts.any():
        return [0, length]
    if batch > 1 or position_ids.shape[0] > 1:
        raise ValueError("several packed rows in one batch: pack all sequences into one row")
    return [0, *(restarts[0].nonzero().flatten() + 1).tolist(), length]


def _causal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    window: int | None,
    dropout: float,
) -> torch.Tensor:
    """One sequence's causal attention (banded to ``window`` past tokens when the sequence is longer)."""
    length = query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                              enable_gqa=gqa)
    rows = torch.arange(length, device=query.device)
    band = (rows[None, :] <= rows[:, None]) & (rows[None, :] > rows[:, None] - window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=band, dropout_p=dropout, scale=scaling,
                                          enable_gqa=gqa)


def packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for an unpadded (packed or single) row, whose attention :func:`packed_attention` bounds itself;
    SDPA's mask when the call carries a padding mask."""
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def enable_packing(model: Any) -> bool:
    """Switch a transformers model to :data:`PACKED_ATTENTION`; False (model unchanged) when its attention is
    not pluggable through ``AttentionInterface``."""
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(PACKED_ATTENTION)
    return bool(model.config._attn_implementation == PACKED_ATTENTION)


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)
