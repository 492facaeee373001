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


class Gated:
    """A batch function that holds each batch until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.gate.wait(10)
        self.batches.append(items)
        return [i * 10 for i in items]


def test_requests_whose_clients_left_give_their_queue_slots_back() -> None:
    model = Gated()

    async def scenario() -> int:
        batcher = MicroBatcher(model, max_batch_size=1, max_wait_ms=0, max_queue=4)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # item 1 is in the model; the queue is empty
        gone = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4, 5)]
        await asyncio.sleep(0)
        assert batcher.depth == 4
        for task in gone:  # their clients disconnect
            task.cancel()
        await asyncio.sleep(0)
        assert batcher.depth == 0  # was 4: a live request got 503 'queue full' behind nothing
        live = asyncio.create_task(batcher.submit(9))
        await asyncio.sleep(0)
        model.gate.set()
        result = await live
        await running
        await batcher.stop()
        return result

    assert asyncio.run(scenario()) == 90
    assert model.batches == [[1], [9]]  # the abandoned items never reached the model


def test_retry_after_counts_the_running_batch_before_any_batch_has_ended() -> None:
    model = Gated()

    async def scenario() -> float:
        batcher = MicroBatcher(model, max_batch_size=1, max_wait_ms=0, max_queue=2)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(0))]
        await asyncio.sleep(0.05)  # item 0 is in the model
        tasks += [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(1.2)  # item 0 has been in the model over 1.2 s; items 1 and 2 fill the queue
        with pytest.raises(ServiceOverloadedError) as refused:
            await batcher.submit(9)
        model.gate.set()
        await asyncio.gather(*tasks)
        await batcher.stop()
        return refused.value.retry_after_s

    # three batches (two queued, one running) of at least 1.2 s each; it said 1 s until a batch had ended
    assert asyncio.run(scenario()) >= 4
