"""MicroBatcher: concurrent items share model calls, order is kept, the queue is bounded, stop drains."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fintune.errors import ServiceOverloadedError
from fintune.serving.batching import MicroBatcher


class Recorder:
    """A batch function that remembers its batch sizes and the thread it ran in."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.threads: set[int] = set()
        self.delay_s = delay_s

    def __call__(self, items: list[int]) -> list[int]:
        self.sizes.append(len(items))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)
        return [i * 10 for i in items]


def test_concurrent_items_are_batched_in_order_off_the_loop() -> None:
    recorder = Recorder(delay_s=0.02)

    async def scenario() -> list[int]:
        batcher = MicroBatcher(recorder, max_batch_size=8, max_wait_ms=20, max_queue=100)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.stop()
        assert threading.get_ident() not in recorder.threads
        return list(results)

    assert asyncio.run(scenario()) == [i * 10 for i in range(20)]
    assert sum(recorder.sizes) == 20 and max(recorder.sizes) == 8 and len(recorder.sizes) <= 4


def test_batch_size_one_runs_one_item_per_call() -> None:
    recorder = Recorder()

    async def scenario() -> None:
        batcher = MicroBatcher(recorder, max_batch_size=1, max_wait_ms=5, max_queue=100)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        await batcher.stop()

    asyncio.run(scenario())
    assert recorder.sizes == [1] * 5


def test_full_queue_refuses_a_request_whole() -> None:
    async def scenario() -> None:
        batcher = MicroBatcher(Recorder(delay_s=0.2), max_batch_size=2, max_wait_ms=0, max_queue=3)
        await batcher.start()
        first = asyncio.create_task(batcher.submit_many([1, 2]))
        await asyncio.sleep(0.05)  # the first batch is running; the queue is empty again
        second = asyncio.create_task(batcher.submit_many([3, 4, 5]))
        await asyncio.sleep(0)
        with pytest.raises(ServiceOverloadedError, match="retry in"):
            await batcher.submit_many([6])
        assert await first == [10, 20] and await second == [30, 40, 50]
        assert batcher.stats.rejected == 1
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_finishes_queued_items_and_failures_reach_every_caller() -> None:
    def flaky(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("model broke")
        time.sleep(0.05)
        return items

    async def scenario() -> None:
        batcher = MicroBatcher(flaky, max_batch_size=4, max_wait_ms=1, max_queue=100)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(10)]
        await asyncio.sleep(0)
        await batcher.stop()  # graceful: everything queued before stop is answered
        assert batcher.depth == 0 and batcher.stats.items == 10
        assert await asyncio.gather(*tasks) == list(range(10))
        await batcher.start()
        with pytest.raises(RuntimeError, match="model broke"):
            await batcher.submit(13)
        await batcher.stop()

    asyncio.run(scenario())
