"""Length buckets: every sentence once, no batch over its size, no sentence far shorter than its batch's longest."""

from __future__ import annotations

import random

import pytest

from fintune.model.buckets import length_buckets


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.65, 1.0])
def test_buckets_cover_every_sentence_once_within_size_and_ratio(ratio: float) -> None:
    rng = random.Random(7)
    lengths = [rng.randint(5, 90) for _ in range(200)]
    buckets = list(length_buckets(lengths, max_size=16, min_length_ratio=ratio))
    assert sorted(i for bucket in buckets for i in bucket) == list(range(200))
    for bucket in buckets:
        assert len(bucket) <= 16
        assert all(lengths[i] >= ratio * lengths[bucket[0]] for i in bucket)
        assert lengths[bucket[0]] == max(lengths[i] for i in bucket)


def test_a_mixed_group_is_split_where_padding_would_dominate() -> None:
    lengths = [80, 12, 75, 10, 11, 78]
    assert list(length_buckets(lengths, max_size=32, min_length_ratio=0.65)) == [[0, 5, 2], [1, 4, 3]]
    assert list(length_buckets(lengths, max_size=32, min_length_ratio=0.0)) == [[0, 5, 2, 1, 4, 3]]


def test_no_sentences_no_batches() -> None:
    assert list(length_buckets([], max_size=8, min_length_ratio=0.65)) == []
