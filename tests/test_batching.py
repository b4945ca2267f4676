"""The generic micro-batcher (inferd/batching.py): batch composition, limits, cancellation, failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from inferd.batching import BatchAbortedError, BatcherStoppedError, BatchLimits, BatchRecord, MicroBatcher, QueueFullError


class _GatedModel:
    """run_batch that blocks until released, recording each batch it was given."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on or set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        self.gate.wait(5)
        if self.fail_on & set(items):
            raise ValueError(f"bad item in {items}")
        return [x * 10 for x in items]


def _started(model, limits: BatchLimits, **kwargs) -> MicroBatcher:
    batcher = MicroBatcher(model, limits, **kwargs)
    batcher.start()
    return batcher


def test_items_queued_while_a_batch_runs_form_the_next_batch_in_order():
    model = _GatedModel()
    batcher = _started(model, BatchLimits(max_batch_items=3))
    try:
        first = batcher.submit(0)
        assert model.entered.wait(5)
        futures = batcher.submit_many([1, 2, 3, 4, 5])
        model.gate.set()
        assert first.result(5) == 0
        assert [f.result(5) for f in futures] == [10, 20, 30, 40, 50]
        assert model.batches == [[0], [1, 2, 3], [4, 5]]
        assert batcher.num_batches == 3 and batcher.num_items_run == 6
    finally:
        batcher.shutdown()


def test_cost_budget_splits_batches_and_an_oversized_item_runs_alone():
    model = _GatedModel()
    batcher = _started(model, BatchLimits(max_batch_items=10, max_batch_cost=10), cost=lambda x: x)
    try:
        blocker = batcher.submit(1)
        assert model.entered.wait(5)
        futures = batcher.submit_many([4, 5, 2, 30, 3])
        model.gate.set()
        assert blocker.result(5) == 10
        assert [f.result(5) for f in futures] == [40, 50, 20, 300, 30]
        # 4+5 fit (9); +2 would be 11. 2 alone then 30 would exceed: 2 runs, then 30 alone, then 3.
        assert model.batches == [[1], [4, 5], [2], [30], [3]]
    finally:
        batcher.shutdown()


def test_max_wait_lets_a_burst_coalesce():
    model = _GatedModel()
    model.gate.set()
    batcher = _started(model, BatchLimits(max_batch_items=4, max_wait_s=0.5))
    try:
        futures = [batcher.submit(0)]
        time.sleep(0.05)
        futures += batcher.submit_many([1, 2])
        time.sleep(0.05)
        futures += batcher.submit_many([3, 4])  # the batch fills at 4 items: it runs without waiting further
        assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40]
        assert model.batches == [[0, 1, 2, 3], [4]]
    finally:
        batcher.shutdown()


def test_a_failing_item_fails_alone_and_the_rest_of_its_batch_succeeds():
    model = _GatedModel(fail_on={2})
    records: list[BatchRecord] = []
    batcher = _started(model, BatchLimits(max_batch_items=8), on_batch=records.append)
    try:
        blocker = batcher.submit(0)
        assert model.entered.wait(5)
        futures = batcher.submit_many([1, 2, 3])
        model.gate.set()
        assert blocker.result(5) == 0
        assert futures[0].result(5) == 10 and futures[2].result(5) == 30
        with pytest.raises(ValueError, match="bad item"):
            futures[1].result(5)
        assert model.batches == [[0], [1, 2, 3], [1], [2], [3]]
        assert [r.num_items for r in records] == [1, 3]
        assert records[1].is_retried_alone and not records[0].is_retried_alone
    finally:
        batcher.shutdown()


def test_an_aborted_batch_fails_all_its_items_at_once_without_retries():
    """BatchAbortedError (e.g. the worker process died) is no item's fault: the batch is not run again item by
    item, every item gets the error, and the next batch runs normally."""
    calls: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            raise BatchAbortedError("worker died")
        return [x * 10 for x in items]

    records: list[BatchRecord] = []
    # a full batch (3 items) runs at once; fewer would wait out max_wait_s
    batcher = _started(run_batch, BatchLimits(max_batch_items=3, max_wait_s=5.0), on_batch=records.append)
    try:
        for future in batcher.submit_many([1, 2, 3]):
            with pytest.raises(BatchAbortedError, match="worker died"):
                future.result(5)
        assert [f.result(5) for f in batcher.submit_many([4, 5, 6])] == [40, 50, 60]
        assert calls == [[1, 2, 3], [4, 5, 6]]
        assert not records[0].is_retried_alone
    finally:
        batcher.shutdown()


def test_queue_limit_takes_all_of_a_request_or_none():
    model = _GatedModel()
    batcher = _started(model, BatchLimits(max_batch_items=1, max_queue_items=3))
    try:
        running = batcher.submit(0)
        assert model.entered.wait(5)
        queued = batcher.submit_many([1, 2])
        with pytest.raises(QueueFullError, match="max_queue_items 3"):
            batcher.submit_many([3, 4])
        assert batcher.num_queued_items == 2
        last = batcher.submit(5)
        model.gate.set()
        assert [f.result(5) for f in [running, *queued, last]] == [0, 10, 20, 50]
    finally:
        batcher.shutdown()


def test_cancelled_items_are_skipped_and_async_cancel_drops_queued_items():
    model = _GatedModel()
    batcher = _started(model, BatchLimits(max_batch_items=8))

    async def scenario() -> None:
        blocker = batcher.submit(0)
        assert await asyncio.to_thread(model.entered.wait, 5)
        task = asyncio.ensure_future(batcher.submit_many_async([1, 2]))
        kept = asyncio.ensure_future(batcher.submit_many_async([3]))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        model.gate.set()
        assert await kept == [30]
        assert blocker.result(5) == 0

    try:
        asyncio.run(scenario())
        assert model.batches == [[0], [3]]
    finally:
        batcher.shutdown()


def test_shutdown_fails_queued_items_and_refuses_new_ones():
    model = _GatedModel()
    batcher = _started(model, BatchLimits(max_batch_items=1))
    running = batcher.submit(0)
    assert model.entered.wait(5)
    queued = batcher.submit(1)
    threading.Timer(0.05, model.gate.set).start()
    batcher.shutdown()
    assert running.result(5) == 0
    with pytest.raises(BatcherStoppedError):
        queued.result(5)
    with pytest.raises(BatcherStoppedError):
        batcher.submit(2)


def test_limits_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="max_batch_items"):
        BatchLimits(max_batch_items=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        BatchLimits(max_wait_s=-1)


def test_preferred_batch_costs_run_at_once_without_waiting_out_the_delay():
    model = _GatedModel()
    model.gate.set()
    # A 10 s delay: without the preferred costs nothing below would run before the futures time out.
    limits = BatchLimits(max_batch_items=8, max_batch_cost=8, max_wait_s=10.0, preferred_batch_costs=(4,))
    batcher = _started(model, limits, cost=lambda x: x)
    try:
        first = batcher.submit_many([3, 1, 2])  # head sums 3, 4, 6: 4 is preferred, so [3, 1] runs
        assert [f.result(5) for f in first[:2]] == [30, 10]
        second = batcher.submit_many([2])  # queue [2, 2] sums to 4: both run
        assert first[2].result(5) == 20 and second[0].result(5) == 20
        assert model.batches == [[3, 1], [2, 2]]
    finally:
        batcher.shutdown()


def test_preferred_batch_costs_are_validated():
    with pytest.raises(ValueError, match="preferred_batch_costs"):
        BatchLimits(preferred_batch_costs=(0,))


def test_without_a_worker_thread_run_ready_runs_batches_on_the_caller():
    calls: list[tuple[list[int], str]] = []

    def model(items: list[int]) -> list[int]:
        calls.append((list(items), threading.current_thread().name))
        return [x * 10 for x in items]

    batcher = MicroBatcher(model, BatchLimits(max_batch_items=2), use_worker_thread=False)
    assert not batcher.is_running
    batcher.start()
    try:
        assert batcher.is_running
        futures = batcher.submit_many([1, 2, 3])
        assert not any(f.done() for f in futures) and calls == []
        assert batcher.run_ready() is None
        assert [f.result(0) for f in futures] == [10, 20, 30]
        assert calls == [([1, 2], threading.current_thread().name), ([3], threading.current_thread().name)]
    finally:
        batcher.shutdown()
    with pytest.raises(BatcherStoppedError):
        batcher.submit(4)


def test_run_ready_reports_the_wait_until_a_partial_batch_may_run():
    model = _GatedModel()
    model.gate.set()
    batcher = MicroBatcher(model, BatchLimits(max_batch_items=3, max_wait_s=10.0), use_worker_thread=False)
    batcher.start()
    try:
        first = batcher.submit(1)
        wait_s = batcher.run_ready()
        assert wait_s is not None and 0 < wait_s <= 10.0 and model.batches == []
        rest = batcher.submit_many([2, 3])  # the batch is full: it runs without waiting out the delay
        assert batcher.run_ready() is None
        assert [f.result(0) for f in [first, *rest]] == [10, 20, 30] and model.batches == [[1, 2, 3]]
    finally:
        batcher.shutdown()


def test_two_workers_run_two_batches_at_once_and_leftovers_wake_the_idle_one():
    """With num_workers=2, while one batch is held inside the model the other worker takes the next items (the
    first worker's leftovers, which wake it), and every item still gets its own result."""
    running = threading.Semaphore(0)
    release = threading.Event()
    batches: list[list[int]] = []

    def model(items: list[int]) -> list[int]:
        batches.append(list(items))
        running.release()
        release.wait(5)
        return [x * 10 for x in items]

    batcher = MicroBatcher(model, BatchLimits(max_batch_items=2), num_workers=2)
    batcher.start()
    try:
        futures = batcher.submit_many([1, 2, 3, 4, 5])  # one notify: the second worker is woken by the leftovers
        assert running.acquire(timeout=5) and running.acquire(timeout=5)  # two batches inside the model at once
        assert sorted(batches) == [[1, 2], [3, 4]]
        release.set()
        assert [f.result(5) for f in futures] == [10, 20, 30, 40, 50]
        assert batcher.num_batches == 3 and batcher.num_items_run == 5
    finally:
        release.set()
        batcher.shutdown()
    assert not batcher.is_running
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        MicroBatcher(model, BatchLimits(), num_workers=0)


def test_two_idle_workers_split_a_burst_between_them():
    """Four items arrive at once at two idle workers: each takes two (ceil(4 / 2)), not one worker all four."""
    entered = threading.Semaphore(0)
    release = threading.Event()
    batches: list[list[int]] = []

    def model(items: list[int]) -> list[int]:
        batches.append(list(items))
        entered.release()
        release.wait(5)
        return items

    batcher = MicroBatcher(model, BatchLimits(max_batch_items=8), num_workers=2)
    batcher.start()
    try:
        deadline = time.monotonic() + 5
        while batcher._num_idle_workers < 2 and time.monotonic() < deadline:  # both workers wait for work
            time.sleep(0.01)
        futures = batcher.submit_many([1, 2, 3, 4])
        assert entered.acquire(timeout=5) and entered.acquire(timeout=5)
        assert sorted(batches) == [[1, 2], [3, 4]]
        release.set()
        assert [f.result(5) for f in futures] == [1, 2, 3, 4]
    finally:
        release.set()
        batcher.shutdown()


def test_fill_wait_waits_for_the_items_recent_concurrency_predicts():
    # 6 items were outstanding at once (4 running + 2 queued): after the batch of 4, the free worker waits for 6
    # queued items (the closed-loop clients coming back) instead of running the 2 that are there.
    model = _GatedModel()
    batcher = _started(model, BatchLimits(max_batch_items=16, fill_wait_s=5.0, fill_gap_s=5.0))
    try:
        first = batcher.submit_many([0, 1, 2, 3])
        assert model.entered.wait(5)
        second = batcher.submit_many([4, 5])
        model.gate.set()
        assert [f.result(5) for f in first] == [0, 10, 20, 30]
        third = batcher.submit_many([6, 7, 8, 9])
        assert [f.result(5) for f in second + third] == [40, 50, 60, 70, 80, 90]
        assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    finally:
        batcher.shutdown()


def test_fill_wait_never_holds_a_lone_client():
    # One item outstanding at a time: each runs at once, long before fill_wait_s or fill_gap_s
    model = _GatedModel()
    model.gate.set()
    batcher = _started(model, BatchLimits(max_batch_items=16, fill_wait_s=10.0, fill_gap_s=10.0))
    try:
        for item in range(3):
            assert batcher.submit(item).result(timeout=5) == item * 10
        assert model.batches == [[0], [1], [2]]
    finally:
        batcher.shutdown()
