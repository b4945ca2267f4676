"""Layer 0: a generic micro-batcher for models without a KV cache (embedding and tabular models).

Many small requests arrive from the event loop; one worker thread runs the model on batches of them:

    batcher = MicroBatcher(run_batch, BatchLimits(max_batch_items=64, max_batch_cost=8192), cost=len)
    batcher.start()
    futures = batcher.submit_many(items)        # concurrent.futures.Future per item, from any thread
    results = await batcher.submit_many_async(items)   # from the event loop; cancelling it drops the items
    batcher.shutdown()

    # Or several worker threads, each taking the next batch when it is free (e.g. one single-threaded model call per
    # CPU: no thread barrier inside a kernel):
    batcher = MicroBatcher(run_batch, limits, num_workers=2)

    # Or with no worker thread, driven by the owner (e.g. from its event loop, for models that score in microseconds):
    batcher = MicroBatcher(run_batch, limits, use_worker_thread=False); batcher.start()
    futures = batcher.submit_many(items); wait_s = batcher.run_ready()   # runs what may run now, here

Policy (continuous batching, as TEI and Triton's dynamic batcher do it):
  - Items wait in one FIFO queue. When a worker is free it takes items from the head, in order, while the
    batch stays within `max_batch_items` and `max_batch_cost` (the sum of `cost(item)`, e.g. tokens). An item
    whose cost alone exceeds `max_batch_cost` runs in a batch of its own (callers reject what cannot run).
  - With `max_wait_s` > 0 a batch that is not full waits until its oldest item has waited that long, for more
    items to join (Triton's max_queue_delay). With 0 (the default) nothing waits: items that arrive while a batch
    runs form the next one, so an idle server answers a lone request at once.
  - With `preferred_batch_costs` (Triton's preferred_batch_size) a batch that would wait runs at once when the
    items at the head of the queue add up to exactly one of those costs (the largest such run of items).
  - With several workers (`num_workers`), a worker takes at most its part of the queue, ceil(queued items /
    (itself + idle workers)), and wakes an idle one for the rest: a burst is split among the free workers.
  - With `fill_wait_s` > 0 (for closed-loop clients: each sends its next request when its answer arrived) a free
    worker waits for the items it can expect: the most items that were outstanding (queued or running) at once in
    the last second, less those running on other workers, at most `fill_target_items` per free worker. It runs
    when that many are queued, when no item arrived for `fill_gap_s`, or when the head item has waited
    `fill_wait_s`. A lone client (1 outstanding) never waits; 32 clients on 2 workers make batches of ~16
    instead of the ~10 that 'take what is queued' splits them into.
  - `run_batch(items) -> results` (one result per item, same order) runs on the worker thread. If it raises for
    a batch of several items, each item is run again alone, so one bad item fails only its own request; except
    BatchAbortedError (the batch could not run at all, no item's fault: e.g. a worker process died), which fails
    the whole batch at once.
  - A cancelled future (its client left) is skipped before its batch runs.
  - Queue bounds: `max_queue_items` queued items at most; past that `submit_many` raises QueueFullError
    (a 429 at the HTTP edge), and takes all of a request's items or none.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger("inferd.batching")

T = TypeVar("T")
R = TypeVar("R")


def _name_os_thread(name: str) -> None:
    """Give the calling thread its name at the OS level too (Linux: 15 bytes, shown by top -H and in
    /proc/<pid>/task/<tid>/comm, which benchmarks read per-thread CPU time by); a no-op where that fails."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class QueueFullError(RuntimeError):
    """The batcher's queue holds `max_queue_items` already; retry later."""


class BatchAbortedError(RuntimeError):
    """run_batch could not run the batch at all, for no item's fault (e.g. its worker process died): every item
    of the batch fails with this error, none is run again alone."""


class BatcherStoppedError(RuntimeError):
    """The batcher was shut down (or never started) before the item ran."""


@dataclass(frozen=True)
class BatchLimits:
    max_batch_items: int = 64  # items in one batch at most
    max_batch_cost: int | None = None  # sum of cost(item) in one batch at most (e.g. tokens); None = no limit
    max_wait_s: float = 0.0  # how long a batch that is not full may wait for more items, from its oldest item
    max_queue_items: int = 4096  # queued items at most
    preferred_batch_costs: tuple[int, ...] = ()  # with max_wait_s > 0: batch costs that need not wait
    fill_wait_s: float = 0.0  # how long a batch may wait for the items recent concurrency predicts (0: never)
    fill_gap_s: float = 0.002  # ... but no longer than this without a new item
    fill_target_items: int = 32  # items per free worker that batch filling waits for at most

    def __post_init__(self) -> None:
        if self.max_batch_items < 1:
            raise ValueError(f"max_batch_items must be >= 1, got {self.max_batch_items}")
        if self.max_batch_cost is not None and self.max_batch_cost < 1:
            raise ValueError(f"max_batch_cost must be >= 1, got {self.max_batch_cost}")
        if not 0.0 <= self.max_wait_s <= 10.0:
            raise ValueError(f"max_wait_s must be in [0, 10] seconds, got {self.max_wait_s}")
        if self.max_queue_items < 1:
            raise ValueError(f"max_queue_items must be >= 1, got {self.max_queue_items}")
        if not 0.0 <= self.fill_wait_s <= 10.0 or not 0.0 < self.fill_gap_s <= 10.0:
            raise ValueError(f"fill_wait_s must be in [0, 10] and fill_gap_s in (0, 10] seconds, got {self.fill_wait_s}, {self.fill_gap_s}")
        if self.fill_target_items < 1:
            raise ValueError(f"fill_target_items must be >= 1, got {self.fill_target_items}")
        if any(c < 1 for c in self.preferred_batch_costs):
            raise ValueError(f"preferred_batch_costs must be >= 1, got {list(self.preferred_batch_costs)}")


@dataclass(frozen=True)
class BatchRecord:
    """What one batch did, for metrics; times in seconds."""

    num_items: int
    cost: int
    queue_times_s: tuple[float, ...]  # per item: from submit to the start of its batch
    compute_time_s: float
    is_retried_alone: bool  # the batch failed and its items were run one by one


@dataclass
class _Pending(Generic[T, R]):
    item: T
    cost: int
    future: Future[R]
    enqueue_time: float


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        limits: BatchLimits,
        *,
        cost: Callable[[T], int] | None = None,
        on_batch: Callable[[BatchRecord], None] | None = None,
        name: str = "inferd-batcher",
        use_worker_thread: bool = True,
        num_workers: int = 1,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._run_batch = run_batch
        self.limits = limits
        self._cost = cost or (lambda _item: 1)
        self._on_batch = on_batch
        self._name = name
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._queued_cost = 0
        self._cond = threading.Condition()
        self._is_stopping = False
        self._threads: list[threading.Thread] = []
        self._num_workers = num_workers
        self._num_idle_workers = 0  # workers waiting in _take_batch (under the lock)
        self._use_worker_thread = use_worker_thread
        self._is_started = False
        self._num_running_items = 0  # items in batches that workers run now (under the lock)
        self._last_arrival_time = 0.0  # monotonic time of the last submit
        # The most items outstanding (queued + running) at once: in the current and the previous 1 s window
        self._peak_window_start = 0.0
        self._peak_outstanding = 0
        self._previous_peak_outstanding = 0
        # Cumulative counters (read without the lock: ints are replaced atomically).
        self.num_batches = 0
        self.num_items_run = 0

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._is_started:
            return
        self._is_started = True
        if not self._use_worker_thread:
            return  # the owner calls run_ready()
        for index in range(self._num_workers):
            name = self._name if self._num_workers == 1 else f"{self._name}-{index}"
            self._threads.append(threading.Thread(target=self._loop, name=name, daemon=True))
        for thread in self._threads:
            thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._is_stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            self._queued_cost = 0
            self._cond.notify_all()
        for pending in dropped:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(BatcherStoppedError("the model is shutting down"))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)

    @property
    def is_running(self) -> bool:
        if not self._use_worker_thread:
            return self._is_started and not self._is_stopping
        return any(thread.is_alive() for thread in self._threads) and not self._is_stopping

    @property
    def num_queued_items(self) -> int:
        return len(self._queue)

    @property
    def num_queued_cost(self) -> int:
        return self._queued_cost

    # ------------------------------------------------------------------------------------------ submit

    def submit_many(self, items: Sequence[T]) -> list[Future[R]]:
        """Queue every item (all or none); one future per item, in order."""
        now = time.monotonic()
        pending = [_Pending(item, self._cost(item), Future(), now) for item in items]
        with self._cond:
            if not self.is_running:
                raise BatcherStoppedError("the model is not running")
            if len(self._queue) + len(pending) > self.limits.max_queue_items:
                raise QueueFullError(
                    f"{len(self._queue)} items are queued and this request adds {len(pending)} "
                    f"(max_queue_items {self.limits.max_queue_items}); retry later"
                )
            self._queue.extend(pending)
            self._queued_cost += sum(p.cost for p in pending)
            self._last_arrival_time = now
            self._note_outstanding(now)
            self._cond.notify()
        return [p.future for p in pending]

    def submit(self, item: T) -> Future[R]:
        return self.submit_many([item])[0]

    async def submit_many_async(self, items: Sequence[T]) -> list[R]:
        """Results in order. Cancelling the awaiting task cancels the items that have not run yet."""
        futures = self.submit_many(items)
        wrapped = [asyncio.wrap_future(f) for f in futures]
        try:
            return list(await asyncio.gather(*wrapped))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    # ------------------------------------------------------------------------------------------ worker

    def _take_batch(self) -> list[_Pending[T, R]] | None:
        """The next batch (called with the lock held); None when stopping."""
        while True:
            while not self._queue and not self._is_stopping:
                self._wait(None)
            if self._is_stopping:
                return None
            batch, wait_s = self._take_ready_batch()
            if batch:
                return batch
            if wait_s is not None:
                self._wait(wait_s)  # re-check: more items, a stop, or the deadline

    def _wait(self, timeout_s: float | None) -> None:
        self._num_idle_workers += 1
        try:
            self._cond.wait(timeout_s)
        finally:
            self._num_idle_workers -= 1

    _PEAK_WINDOW_S = 1.0

    def _note_outstanding(self, now: float) -> None:
        outstanding = len(self._queue) + self._num_running_items
        if now - self._peak_window_start > self._PEAK_WINDOW_S:
            self._previous_peak_outstanding = self._peak_outstanding
            self._peak_outstanding = 0
            self._peak_window_start = now
        self._peak_outstanding = max(self._peak_outstanding, outstanding)

    def _fill_wait_s(self) -> float:
        """Seconds this free worker should still wait for the items recent concurrency predicts (0: run now)."""
        limits = self.limits
        now = time.monotonic()
        expected = max(self._peak_outstanding, self._previous_peak_outstanding) - self._num_running_items
        num_free = 1 + self._num_idle_workers
        target = min(expected, limits.fill_target_items * num_free, limits.max_batch_items * num_free)
        if len(self._queue) >= target or self._is_full():
            return 0.0
        remaining_s = min(self._queue[0].enqueue_time + limits.fill_wait_s, self._last_arrival_time + limits.fill_gap_s) - now
        return max(0.0, remaining_s)

    def _take_ready_batch(self) -> tuple[list[_Pending[T, R]], float | None]:
        """(a batch that may run now, []) or ([], seconds until the head's deadline; None: the queue is empty)."""
        limits = self.limits
        while self._queue:
            max_items = limits.max_batch_items
            if limits.fill_wait_s > 0:
                fill_wait_s = self._fill_wait_s()
                if fill_wait_s > 0:
                    return [], fill_wait_s
            if limits.max_wait_s > 0 and not self._is_full():
                num_preferred_items = self._num_preferred_items()
                if num_preferred_items > 0:
                    max_items = num_preferred_items
                else:
                    remaining_s = self._queue[0].enqueue_time + limits.max_wait_s - time.monotonic()
                    if remaining_s > 0:
                        return [], remaining_s
            if self._num_workers > 1:  # leave idle workers their part of the queue: ceil(queued / free workers)
                num_free = 1 + self._num_idle_workers
                max_items = min(max_items, -(-len(self._queue) // num_free))
            batch: list[_Pending[T, R]] = []
            batch_cost = 0
            num_taken = 0
            while self._queue and len(batch) < limits.max_batch_items and num_taken < max_items:
                head = self._queue[0]
                if batch and limits.max_batch_cost is not None and batch_cost + head.cost > limits.max_batch_cost:
                    break
                self._queue.popleft()
                num_taken += 1
                self._queued_cost -= head.cost
                if not head.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                batch.append(head)
                batch_cost += head.cost
            if batch:
                return batch, None
        return [], None

    def run_ready(self) -> float | None:
        """Without a worker thread (`use_worker_thread=False`): run every batch that may run now on the calling
        thread. Returns the seconds until the next queued batch may run (its max_wait_s), None when none is queued.

        For a caller that batches on its own event loop: items submitted while one loop callback runs are merged,
        and no thread hop is paid per batch (two hops cost milliseconds on a busy 2-core machine, while a small
        model scores a batch in tens of microseconds)."""
        while True:
            with self._cond:
                if self._is_stopping:
                    return None
                batch, wait_s = self._take_ready_batch()
            if not batch:
                return wait_s
            self._run(batch)

    def _num_preferred_items(self) -> int:
        """How many head items add up to the largest preferred cost reachable within the limits (0: none)."""
        preferred = self.limits.preferred_batch_costs
        if not preferred:
            return 0
        largest = max(preferred)
        num_items = 0
        total_cost = 0
        for index, pending in enumerate(self._queue):
            total_cost += pending.cost
            if index + 1 > self.limits.max_batch_items or total_cost > largest:
                break
            if self.limits.max_batch_cost is not None and total_cost > self.limits.max_batch_cost:
                break
            if total_cost in preferred:
                num_items = index + 1
        return num_items

    def _is_full(self) -> bool:
        limits = self.limits
        if len(self._queue) >= limits.max_batch_items:
            return True
        return limits.max_batch_cost is not None and self._queued_cost >= limits.max_batch_cost

    def _loop(self) -> None:
        _name_os_thread(threading.current_thread().name)
        while True:
            with self._cond:
                batch = self._take_batch()
                if batch is not None and self._queue and self._num_workers > 1:
                    self._cond.notify()  # items are left: an idle worker may take the next batch
                if batch is not None:
                    self._num_running_items += len(batch)
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._num_running_items -= len(batch)

    def _run(self, batch: list[_Pending[T, R]]) -> None:
        started = time.monotonic()
        queue_times_s = tuple(started - p.enqueue_time for p in batch)
        is_retried_alone = False
        try:
            results = self._call(batch)
            for pending, result in zip(batch, results):
                pending.future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - reported to the item's future
            if len(batch) == 1 or isinstance(exc, BatchAbortedError):
                for pending in batch:
                    pending.future.set_exception(exc)
            else:
                is_retried_alone = True
                logger.warning("%s: a batch of %d failed (%s); running its items one by one", self._name, len(batch), exc)
                for pending in batch:
                    try:
                        pending.future.set_result(self._call([pending])[0])
                    except Exception as item_exc:  # noqa: BLE001
                        pending.future.set_exception(item_exc)
        compute_time_s = time.monotonic() - started
        with self._cond:  # several workers may finish at once
            self.num_batches += 1
            self.num_items_run += len(batch)
        if self._on_batch is not None:
            record = BatchRecord(len(batch), sum(p.cost for p in batch), queue_times_s, compute_time_s, is_retried_alone)
            try:
                self._on_batch(record)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                logger.exception("%s: on_batch callback failed", self._name)

    def _call(self, batch: list[_Pending[T, R]]) -> Sequence[R]:
        results = self._run_batch([p.item for p in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        return results
