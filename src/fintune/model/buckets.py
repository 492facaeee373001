"""Length buckets: how a set of sentences is cut into model batches with little padding.

A batch is padded to its longest sentence, so a batch that mixes short and long sentences spends most of its
arithmetic on padding. Sorting by length and starting a new batch when a sentence is much shorter than the
batch's longest bounds that waste; a batch also never exceeds the configured size. Shared by the QLoRA
classifier and the encoder fallback (this module imports nothing heavy).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def length_buckets(lengths: Sequence[int], max_size: int, min_length_ratio: float) -> Iterator[list[int]]:
    """Indices, longest first, in batches of at most ``max_size`` whose every sentence is at least
    ``min_length_ratio`` times as long as the batch's first (longest) one."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batch: list[int] = []
    for index in order:
        if batch and (len(batch) >= max_size or lengths[index] < min_length_ratio * lengths[batch[0]]):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch
