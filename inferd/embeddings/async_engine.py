"""Layer 4: the served embedding engine (`ServedEngine` of kind embed): continuous micro-batching under a token
budget in front of one `EmbeddingModel`.

    engine = AsyncEmbedEngine.from_path(path, {"max_batch_tokens": 8192}, on_batch=metrics_hook)
    engine.start()                                  # on the event loop's thread
    vectors = await engine.embed([[101, 7592, 102], [101, 2088, 102]])   # float32 [2, dim]
    engine.shutdown()

Every input is one item of `inferd.batching.MicroBatcher` whose cost is its token count: a free worker thread
takes items FIFO while the batch stays within `max_batch_tokens` and `max_batch_items` (TEI's max_batch_tokens
idea), runs them as one packed sequence (no padding), and items that arrive meanwhile form the next batch. A
request's inputs may be split across batches; its vectors are the same either way (the encoder is
batch-independent). Cancelling `embed` (the client left) drops its items that have not run yet.

On CPU the engine has `num_threads` workers (default: one per CPU), each running its batch on ONE torch thread,
rather than one worker whose kernels fan out to several OpenMP threads: a multi-threaded kernel ends at a barrier
that waits for its slowest thread, and on a shared machine (other processes, this server's event loop, an LLM
stepping beside it) that thread is often descheduled (benchmarks/RESULTS.md: on the project's loaded 2-core
machine, batch 1 in process ran many times slower on two threads than on one). How many workers may compute at
once follows the CPU share (inferd.device.CpuThreadShare): all of them while no other model computes, one per CPU
left while an LLM decodes beside them.

On CPU the batches compute in a worker process by default (`worker: process`, inferd.embeddings.worker): the
server's worker threads only hand token ids over and wait for the vectors without holding the GIL, so an LLM
stream and the event loop in the server never wait for the embedding compute to give the GIL back. The child runs
at `worker_nice` (default 5) above the server's niceness, so the LLM's step loop and the event loop win a CPU they
contend for with it. `worker: thread` computes on the server's own worker threads (the earlier design). The
vectors are bitwise the same either way (same code, one torch thread per batch).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inferd.batching import BatchLimits, BatchRecord, MicroBatcher
from inferd.device import CPU_THREADS, CpuThreadHolder, num_cpus, resolve_device
from inferd.embeddings.model import EmbeddingModel
from inferd.embeddings.worker import EmbedWorkerProcess
from inferd.serving import ModelKind


def default_num_threads() -> int:
    """The model's thread cap when the models file does not set num_threads: one worker per CPU."""
    return num_cpus()


_SHARE_RECHECK_S = 0.02  # a worker held back by the CPU share looks again this often (another model may be done)


@dataclass(frozen=True)
class EmbedOptions:
    """Per-model options of an embedding model (a models file's `options:` or defaults)."""

    max_batch_tokens: int = 16384  # tokens in one packed batch at most (TEI's default)
    max_batch_items: int = 256  # inputs in one batch at most
    max_wait_ms: float = 0.0  # how long a batch that is not full waits for more inputs (0: never; see batching.py)
    # How long a free worker may wait for the inputs recent concurrency predicts (closed-loop clients coming back
    # with their next request; batching.py), and for at most fill_gap_ms without a new input (0: never waits)
    fill_wait_ms: float = 25.0
    fill_gap_ms: float = 5.0
    max_queue: int = 4096  # queued inputs at most; past that a request gets 429
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"  # "int8": opt-in int8 linear layers on CPU (EmbeddingModel.from_path)
    # CPU threads this model computes on at most: that many single-threaded workers (0: default_num_threads()).
    # Within that cap the model takes its share of the CPUs (inferd.device.CpuThreadShare): all of them while no
    # other model computes, an even split while an LLM decodes beside it.
    num_threads: int = 0
    # Where CPU batches compute: "process" (a worker process of the model's own, inferd.embeddings.worker) or
    # "thread" (worker threads of the server process). Off CPU the model computes in the server process.
    worker: str = "process"
    worker_nice: int = 5  # the worker process's niceness above the server's (0-19; 0: the same priority)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> EmbedOptions:
        known = list(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown embedding model option(s) {unknown}; known: {known}")
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key in ("max_batch_tokens", "max_batch_items", "max_queue"):
                values[key] = _as_int(key, value, minimum=1)
            elif key == "num_threads":
                values[key] = _as_int(key, value, minimum=0)
            elif key == "worker_nice":
                values[key] = _as_int(key, value, minimum=0)
                if values[key] > 19:
                    raise ValueError(f"option worker_nice must be in [0, 19], got {values[key]}")
            elif key == "worker":
                if value not in ("process", "thread"):
                    raise ValueError(f"option worker must be 'process' or 'thread', got {value!r}")
                values[key] = value
            elif key == "max_wait_ms":
                values[key] = _as_float(key, value, 0.0, 10_000.0)
            elif key in ("fill_wait_ms", "fill_gap_ms"):
                values[key] = _as_float(key, value, 0.0 if key == "fill_wait_ms" else 0.01, 1000.0)
            else:
                if not isinstance(value, str):
                    raise ValueError(f"option {key} must be a string, got {value!r}")
                values[key] = value
        return cls(**values)


def _as_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"option {key} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"option {key} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"option {key} must be >= {minimum}, got {number}")
    return number


def _as_float(key: str, value: Any, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"option {key} must be in [{low}, {high}], got {number}")
    return number


@dataclass(frozen=True)
class EmbedEngineStats:
    num_queued_items: int  # inputs waiting for a batch
    num_queued_tokens: int
    num_batches: int  # cumulative
    num_items_run: int  # cumulative


class AsyncEmbedEngine:
    kind = ModelKind.EMBED

    def __init__(
        self,
        model: EmbeddingModel,
        options: EmbedOptions | None = None,
        *,
        on_batch: Callable[[BatchRecord], None] | None = None,
        worker: EmbedWorkerProcess | None = None,
    ) -> None:
        """`worker`: a started worker process the batches compute in (from_path makes it for `worker: process`
        on CPU); None: they compute on the batcher's threads in this process."""
        self.model = model
        self._worker = worker
        self.options = options or EmbedOptions()
        limits = BatchLimits(
            max_batch_items=self.options.max_batch_items,
            max_batch_cost=self.options.max_batch_tokens,
            max_wait_s=self.options.max_wait_ms / 1000.0,
            max_queue_items=self.options.max_queue,
            fill_wait_s=self.options.fill_wait_ms / 1000.0,
            fill_gap_s=self.options.fill_gap_ms / 1000.0,
        )
        self._is_cpu = model.device == "cpu"
        self._num_workers = (self.options.num_threads or default_num_threads()) if self._is_cpu else 1
        self._cpu_threads: CpuThreadHolder | None = None  # set by start() on CPU
        self._gate = threading.Condition()  # how many workers compute now, within the CPU share
        self._num_computing = 0
        self._batcher: MicroBatcher[tuple[int, ...], np.ndarray] = MicroBatcher(
            self._run_batch, limits, cost=len, on_batch=on_batch, name="inferd-embed", num_workers=self._num_workers
        )

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        options: Mapping[str, Any] | None = None,
        *,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> AsyncEmbedEngine:
        parsed = EmbedOptions.from_mapping(options or {})
        worker = None
        if parsed.worker == "process" and resolve_device(parsed.device) == "cpu":
            worker = EmbedWorkerProcess(path, num_channels=parsed.num_threads or default_num_threads(),
                                        dtype=parsed.dtype, quantization=parsed.quantization, nice=parsed.worker_nice)
            worker.launch()  # the child loads its copy while this process loads the tokenizer and checks the files
        try:
            # with a worker process, this process needs the tokenizer, limits and dimension, not the weights
            model = EmbeddingModel.from_path(path, device=parsed.device, dtype=parsed.dtype,
                                             quantization=parsed.quantization, load_weights=worker is None)
            if worker is not None:
                worker.start()  # on the loading thread: waits until the child is ready
        except BaseException:
            if worker is not None:
                worker.close()
            raise
        return cls(model, parsed, on_batch=on_batch, worker=worker)

    # what the server and routes read
    @property
    def tokenizer(self):  # EmbedTokenizer: encode(text, add_special_tokens=True) -> list[int], vocab_size
        return self.model.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    @property
    def dimension(self) -> int:
        return self.model.dimension

    # ServedEngine
    def start(self) -> None:
        if self._is_cpu and self._cpu_threads is None:
            self._cpu_threads = CPU_THREADS.register(max_threads=self._num_workers)
        self._batcher.start()

    def shutdown(self) -> None:
        self._batcher.shutdown()
        if self._worker is not None:
            self._worker.close()
        if self._cpu_threads is not None:
            self._cpu_threads.close()
            self._cpu_threads = None

    @property
    def is_running(self) -> bool:
        return self._batcher.is_running

    def abort(self, request_id: str) -> None:
        """Nothing to do by id: cancelling the task awaiting `embed` drops its queued inputs."""

    def get_stats(self) -> EmbedEngineStats:
        return EmbedEngineStats(
            num_queued_items=self._batcher.num_queued_items,
            num_queued_tokens=self._batcher.num_queued_cost,
            num_batches=self._batcher.num_batches,
            num_items_run=self._batcher.num_items_run,
        )

    # submit
    async def embed(self, token_id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n, dimension], one row per token-id list (special tokens included, each list within
        max_seq_length and the vocabulary: ValueError otherwise). Raises inferd.batching.QueueFullError when the
        queue cannot take all n inputs, BatcherStoppedError when the engine is not running."""
        if not token_id_lists:
            return np.zeros((0, self.dimension), dtype=np.float32)
        items = [tuple(int(t) for t in ids) for ids in token_id_lists]
        for index, ids in enumerate(items):
            try:
                self.model.check_token_ids(ids)
            except ValueError as exc:
                raise ValueError(f"input {index}: {exc}") from None
        rows = await self._batcher.submit_many_async(items)
        return np.stack(rows)

    def _run_batch(self, items: list[tuple[int, ...]]) -> list[np.ndarray]:
        # runs on one of the batcher's worker threads
        holder = self._cpu_threads
        compute = self._worker.run if self._worker is not None else self.model.embed_token_ids
        if holder is None:  # not on CPU (or not started through start())
            return list(compute(items))
        if torch.get_num_threads() != 1:  # per thread: this worker's kernels stay on its own thread
            torch.set_num_threads(1)
        with self._gate:
            while self._num_computing >= holder.num_threads():  # the CPU share allows this many workers now
                self._gate.wait(_SHARE_RECHECK_S)
            self._num_computing += 1
            holder.mark_busy()
        try:
            return list(compute(items))
        finally:
            with self._gate:
                self._num_computing -= 1
                if self._num_computing == 0:
                    holder.release()
                self._gate.notify()
