"""Padding-free batches: a packed row scores every sentence as a padded batch does, windowed attention included."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fintune.config import Settings
from fintune.model.inference import SentimentClassifier, prepare_base
from fintune.model.loading import load_tokenizer, resolve_base
from fintune.model.packing import (
    BOUNDS_KWARG,
    PACKED_ATTENTION,
    PackedBatch,
    bounds_from_positions,
    enable_packing,
    pack_groups,
)
from fintune.model.quantization import load_base

TEXTS = [
    "Profit rose .",
    "Operating profit fell to EUR 3.1 mn from EUR 30.0 mn in the corresponding period of the previous year .",
    "Net sales were flat .",
    "The company said it would cut 120 jobs at its plant in Finland , citing weak demand for paper .",
    "Orders grew .",
]


def test_groups_keep_input_order_and_respect_both_limits() -> None:
    lengths = [5, 9, 3, 7, 2, 30, 4]
    groups = list(pack_groups(lengths, max_sentences=3, max_tokens=16))
    assert [i for group in groups for i in group] == list(range(len(lengths)))
    assert all(len(group) <= 3 for group in groups)
    assert all(sum(lengths[i] for i in group) <= 16 for group in groups if len(group) > 1)
    assert groups == [[0, 1], [2, 3, 4], [5], [6]]  # 30 tokens: a group of its own
    assert list(pack_groups([], max_sentences=3, max_tokens=16)) == []


def test_a_packed_row_restarts_positions_at_each_sentence() -> None:
    packed = PackedBatch.of([[7, 8, 9], [4], [5, 6]])
    assert packed.input_ids.tolist() == [[7, 8, 9, 4, 5, 6]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.bounds == [0, 3, 4, 6]
    assert packed.last_positions.tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match="no empty one"):
        PackedBatch.of([[1], []])


def test_sequence_bounds_are_read_from_where_the_positions_restart() -> None:
    assert bounds_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1, 6) == [0, 3, 5, 6]
    assert bounds_from_positions(torch.arange(4).unsqueeze(0), 1, 4) == [0, 4]
    assert bounds_from_positions(torch.arange(4).repeat(3, 1), 3, 4) == [0, 4]  # a plain batch of 3 rows
    assert bounds_from_positions(None, 1, 5) == [0, 5]
    with pytest.raises(ValueError, match="one row"):
        bounds_from_positions(torch.tensor([[0, 1, 0], [0, 1, 2]]), 2, 3)


def test_a_model_without_pluggable_attention_is_left_as_it_is() -> None:
    assert enable_packing(torch.nn.Linear(2, 2)) is False


def _classifier(model: Any, settings: Settings, packing: bool) -> SentimentClassifier:
    inference = settings.model.inference.model_copy(update={"packing": packing, "batch_size": 8})
    source = resolve_base(settings.model, settings.cache_dir)
    return SentimentClassifier(model, load_tokenizer(source), settings.model.training.prompt_template, inference)


def _tiny_base(settings: Settings) -> Any:
    """tiny-mistral in NF4 with embeddings, norms and head in fp32, as the profile scores."""
    base = load_base(resolve_base(settings.model, settings.cache_dir), settings.model)
    return prepare_base(base, settings.model, settings.model.inference, merge=False)


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_packed_scores_equal_left_padded_scores(tiny_settings: Settings, sliding_window: int | None) -> None:
    torch.manual_seed(0)
    model = _tiny_base(tiny_settings)
    model.config.sliding_window = sliding_window  # 6: shorter than every prompt, so the band really applies
    padded = _classifier(model, tiny_settings, packing=False)
    assert not padded.packed and model.config._attn_implementation != PACKED_ATTENTION
    reference = padded.predict_proba(TEXTS)

    packed = _classifier(model, tiny_settings, packing=True)
    assert packed.packed and model.config._attn_implementation == PACKED_ATTENTION
    scores = packed.predict_proba(TEXTS)
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    np.testing.assert_allclose(packed.predict_proba(TEXTS[1:2]), reference[1:2], atol=1e-5)  # alone
    # a padded batch through the packed implementation falls back to SDPA with the padding mask
    np.testing.assert_allclose(padded.predict_proba(TEXTS), reference, atol=1e-5)


def test_the_full_head_reads_the_same_answer_positions_as_the_label_rows(tiny_settings: Settings) -> None:
    classifier = _classifier(_tiny_base(tiny_settings), tiny_settings, packing=True)
    sequences = classifier.tokenizer(classifier.prompts(TEXTS))["input_ids"]
    with torch.inference_mode():
        full = classifier._label_logits(sequences, None)
        rows = classifier._label_logits(sequences, classifier._label_rows)
    assert full.shape == (len(TEXTS), 3)
    torch.testing.assert_close(full, rows, rtol=1e-4, atol=1e-4)


def test_a_packed_row_without_bounds_is_not_attended_across_and_generation_still_works(
    tiny_settings: Settings,
) -> None:
    model = _tiny_base(tiny_settings).eval()
    classifier = _classifier(model, tiny_settings, packing=True)
    sequences = classifier.tokenizer(classifier.prompts(TEXTS))["input_ids"]
    inputs = PackedBatch.of(sequences).model_inputs(torch.device("cpu"))
    with torch.inference_mode():
        with_bounds = model.get_decoder()(**inputs).last_hidden_state
        del inputs[BOUNDS_KWARG]  # as a padding-free batch from elsewhere (TRL) comes: position ids only
        from_positions = model.get_decoder()(**inputs).last_hidden_state
    torch.testing.assert_close(from_positions, with_bounds)

    prompt = torch.tensor([sequences[1]])
    with torch.inference_mode():
        packed = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("sdpa")
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert packed.tolist() == plain.tolist()  # the KV-cache steps went through SDPA, not the packed path
