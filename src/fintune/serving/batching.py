"""Dynamic micro-batching: concurrent requests' texts gathered into one model call, run off the event loop.

:class:`MicroBatcher` keeps a bounded queue of pending items. A collector task takes the first waiting item,
waits at most ``max_wait_ms`` for more (or until ``max_batch_size`` are there) and hands the batch to ``fn`` in
a single worker thread, so the event loop keeps accepting requests while the model runs and items arriving
meanwhile form the next batch. Admission is all-or-nothing per request: when the queue cannot take a request's
items it raises :class:`~fintune.errors.ServiceOverloadedError` (the service answers 503 + Retry-After) instead
of building an unbounded backlog. :meth:`MicroBatcher.stop` drains what is queued before it returns, so a
graceful shutdown finishes in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from fintune.errors import ServiceOverloadedError

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)  # found in the queue by identity: two requests may send equal texts
class _Pending(Generic[T, R]):
    """One queued item and the future its request awaits."""

    item: T
    future: asyncio.Future[R]


@dataclass
class BatcherStats:
    """Counters of a batcher, for /metrics/json and the load benchmark."""

    batches: int = 0
    items: int = 0
    rejected: int = 0
    largest_batch: int = 0
    busy_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """JSON-ready, with the mean batch size."""
        mean = self.items / self.batches if self.batches else 0.0
        return {**self.__dict__, "mean_batch": round(mean, 2), "busy_s": round(self.busy_s, 3)}


class MicroBatcher(Generic[T, R]):
    """Gathers items from concurrent callers into batches of at most ``max_batch_size`` for ``fn``."""

    def __init__(
        self, fn: Callable[[list[T]], list[R]], *, max_batch_size: int, max_wait_ms: float, max_queue: int
    ) -> None:
        """``fn`` maps a batch to one result per item, in order; it runs in a dedicated worker thread."""
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._last_batch_s = 0.0
        self._running_since: float | None = None  # perf_counter time the running batch started

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch now running)."""
        return len(self._queue)

    async def start(self) -> None:
        """Start the collector task on the running loop."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fintune-model")
        self._closing = False
        self._task = asyncio.create_task(self._collect(), name="fintune-micro-batcher")

    async def stop(self) -> None:
        """Refuse new items, finish every queued one, then stop the worker thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = None

    async def submit(self, item: T) -> R:
        """The result for one item."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Results for several items of one request, in order; all admitted or none (ServiceOverloadedError)."""
        if self._task is None or self._closing:
            raise ServiceOverloadedError(self.depth, self.max_queue, 1.0)
        if len(self._queue) + len(items) > self.max_queue:
            self.stats.rejected += 1
            raise ServiceOverloadedError(len(self._queue), self.max_queue, self.retry_after_s())
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        for entry in pending:
            entry.future.add_done_callback(lambda future, entry=entry: self._forget_if_cancelled(entry))
        self._queue.extend(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _forget_if_cancelled(self, entry: _Pending[T, R]) -> None:
        """Take a cancelled request's item (its client went away) off the queue: it must not hold a slot that
        turns live requests away with 503s, nor count in the depth and Retry-After."""
        if entry.future.cancelled():
            with contextlib.suppress(ValueError):  # already taken for a batch
                self._queue.remove(entry)

    def retry_after_s(self) -> float:
        """A whole-second estimate of when the queue will have drained (at least 1): its batches and the one now
        running, each as long as the last one, or as the running one has taken so far when none has ended yet."""
        running = self._running_since is not None
        batches = math.ceil(len(self._queue) / self.max_batch_size) + running
        per_batch = self._last_batch_s or (time.perf_counter() - self._running_since if running else 0.0)
        return float(max(1, math.ceil(batches * per_batch)))

    async def _collect(self) -> None:
        """Form batches and run them, one at a time, until stopped and drained."""
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill()
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _fill(self) -> None:
        """Wait up to max_wait after the first queued item for the batch to fill."""
        assert self._wakeup is not None
        deadline = time.monotonic() + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take(self) -> list[_Pending[T, R]]:
        """Pop up to max_batch_size items whose callers are still waiting."""
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if not pending.future.done():  # a cancelled request (client gone) costs no model time
                batch.append(pending)
        return batch

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        """Run ``fn`` on the batch in the worker thread and resolve each caller's future."""
        loop = asyncio.get_running_loop()
        started = self._running_since = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.fn, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the batch function's own failure reaches every caller of the batch
            logger.exception("micro-batch of %d items failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            self._running_since = None
            self._record(len(batch), time.perf_counter() - started)
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _record(self, size: int, seconds: float) -> None:
        """Update the counters after a batch."""
        s = self.stats
        s.batches += 1
        s.items += size
        s.largest_batch = max(s.largest_batch, size)
        s.busy_s += seconds
        self._last_batch_s = seconds
