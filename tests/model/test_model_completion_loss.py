"""TRL's fused LM head scoring only the labelled positions on the CPU: the same loss and gradients, less work."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import MistralConfig, MistralForCausalLM
from trl.trainer.utils import add_fused_lm_head

from fintune.model.training import loss_on_completion_positions_only


def _loss_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The fused head's loss on ``batch`` and every parameter's gradient."""
    model.zero_grad()
    loss = model(**batch, fused_lm_head=True).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_only_labelled_positions_reach_the_head_and_nothing_else_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = MistralForCausalLM(config)
    add_fused_lm_head(model)
    input_ids = torch.randint(0, 300, (3, 12))
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]  # a two-token completion after a ten-token prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    rows: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *args: rows.append(hidden.shape[0]) or apply(hidden, *args))
    every_loss, every_grads = _loss_and_grads(model, batch)
    with loss_on_completion_positions_only() as switched:
        labelled_loss, labelled_grads = _loss_and_grads(model, batch)

    assert switched
    assert rows == [3 * 11, 3 * 2]  # all shifted positions before, only the labelled ones within the block
    torch.testing.assert_close(labelled_loss, every_loss)
    for labelled, every in zip(labelled_grads, every_grads, strict=True):
        torch.testing.assert_close(labelled, every)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored after the block


def test_a_trl_without_the_switch_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(trl_utils, "_use_triton")
    with loss_on_completion_positions_only() as switched:
        assert not switched and not hasattr(trl_utils, "_use_triton")
