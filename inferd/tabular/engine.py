"""Layer 4: a tabular model (every served version of one model directory) behind dynamic batching.

    engine = TabularEngine.from_path("repo/fraud", {"max_queue_delay_us": 100}, on_batch=record)
    engine.start()
    result = await engine.infer({"input": rows_fp32}, version=None, output_names=None)   # rows [n, 12]
    result.outputs["probabilities"]   # [n, 2]
    engine.shutdown()

Each version has one onnxruntime session and `instance_count` MicroBatchers in front of it (one worker thread
each; a request goes to the least-loaded). A request is one item of cost = its rows: the batcher merges queued
requests up to max_batch_size rows (within max_queue_delay, preferring Triton's preferred batch sizes), the
session runs once on the rows stacked, and each request gets its own slice back. Tree ensembles score every
row on its own, and sessions run with one intra-op thread unless configured, so a row's scores are bit-identical
batched or alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from inferd.batching import BatcherStoppedError, BatchLimits, BatchRecord, MicroBatcher
from inferd.serving import ModelKind
from inferd.tabular.config import EXECUTORS, MAX_QUEUE_DELAY_US, DynamicBatchingConfig, ModelConfig, VersionPolicy, complete_config
from inferd.tabular.datatypes import oip_datatype_of
from inferd.tabular.repository import read_model_directory
from inferd.tabular.session import DEVICES, OnnxSession
from inferd.tabular.tensors import TensorError

logger = logging.getLogger("inferd.tabular")

# from_path options: key -> what it overrides (the config's value, or the derived one, otherwise).
OPTION_KEYS = {
    "max_batch_size": "rows in one batch at most (0: no batch dimension)",
    "max_queue_delay_us": "how long a batch that is not full waits for more requests; turns dynamic batching on",
    "preferred_batch_sizes": "batch sizes (rows) that run at once without waiting out the delay",
    "dynamic_batching": "false: every request runs alone",
    "instance_count": "batcher threads per version sharing one session",
    "intra_op_threads": "onnxruntime threads per run (default 1: runs are bit-identical batched or alone)",
    "device": "auto | cpu | cuda (onnxruntime's CUDA provider)",
    "max_queue_items": "queued requests per version at most; more get 429",
    "allow_nan": "false: NaN in a float input is a 400",
    "executor": "loop (batches run on the event loop) | thread (on instance_count worker threads)",
}
DEFAULT_MAX_QUEUE_ITEMS = 4096
SHUTDOWN_DRAIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class InferResult:
    version: int
    outputs: dict[str, np.ndarray]  # output name -> [rows, *dims] (in the order asked for, or the config's)


@dataclass
class _Request:
    feeds: dict[str, np.ndarray]  # model input name -> [rows, *model_dims], the model's dtype
    num_rows: int


def _validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown tabular option(s) {unknown}; known: {sorted(OPTION_KEYS)}")
    checked = dict(options)
    for key in ("max_batch_size", "max_queue_delay_us", "instance_count", "intra_op_threads", "max_queue_items"):
        if key in checked:
            value = checked[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"tabular option {key} must be an integer >= 0, got {value!r}")
    if checked.get("max_queue_delay_us", 0) > MAX_QUEUE_DELAY_US:
        raise ValueError(f"tabular option max_queue_delay_us must be <= {MAX_QUEUE_DELAY_US}, got {checked['max_queue_delay_us']}")
    if "preferred_batch_sizes" in checked:
        sizes = checked["preferred_batch_sizes"]
        if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"tabular option preferred_batch_sizes must be a list of positive integers, got {sizes!r}")
    for key in ("dynamic_batching", "allow_nan"):
        if key in checked and not isinstance(checked[key], bool):
            raise ValueError(f"tabular option {key} must be true or false, got {checked[key]!r}")
    if "executor" in checked and checked["executor"] not in EXECUTORS:
        raise ValueError(f"tabular option executor must be one of {list(EXECUTORS)}, got {checked['executor']!r}")
    if "device" in checked and checked["device"] not in DEVICES:
        raise ValueError(f"tabular option device must be one of {list(DEVICES)}, got {checked['device']!r}")
    if checked.get("instance_count") == 0:
        raise ValueError("tabular option instance_count must be >= 1")
    return checked


def _apply_options(config: ModelConfig, options: Mapping[str, Any]) -> ModelConfig:
    changes: dict[str, Any] = {}
    if "max_batch_size" in options:
        changes["max_batch_size"] = options["max_batch_size"]
    batching = config.dynamic_batching
    if "max_queue_delay_us" in options or "preferred_batch_sizes" in options:
        batching = batching or DynamicBatchingConfig()
        batching = DynamicBatchingConfig(
            tuple(options.get("preferred_batch_sizes", batching.preferred_batch_sizes)),
            options.get("max_queue_delay_us", batching.max_queue_delay_us),
        )
    if options.get("dynamic_batching") is False:
        batching = None
    elif options.get("dynamic_batching") is True and batching is None:
        batching = DynamicBatchingConfig()
    changes["dynamic_batching"] = batching
    for key, field_name in (("instance_count", "instance_count"), ("intra_op_threads", "intra_op_threads"), ("allow_nan", "allow_nan"), ("executor", "executor")):
        if key in options:
            changes[field_name] = options[key]
    return replace(config, **changes)


def _load_model_bytes(path: Path) -> bytes:
    if path.suffix == ".onnx":
        return path.read_bytes()
    from inferd.tabular.convert import convert_to_onnx

    return convert_to_onnx(path)


class _Version:
    """One loaded version: its completed config, session and batchers."""

    def __init__(self, version: int, config: ModelConfig, session: OnnxSession, max_queue_items: int,
                 on_batch: Callable[[BatchRecord], None] | None, model_name: str) -> None:  # fmt: skip
        self.version = version
        self.config = config
        self.session = session
        self.output_names = [t.name for t in config.outputs]
        batching = config.dynamic_batching
        if config.max_batch_size > 0 and batching is not None:
            limits = BatchLimits(
                max_batch_items=config.max_batch_size,
                max_batch_cost=config.max_batch_size,
                max_wait_s=batching.max_queue_delay_us / 1e6,
                max_queue_items=max_queue_items,
                preferred_batch_costs=tuple(s for s in batching.preferred_batch_sizes if s <= config.max_batch_size),
            )
        else:
            limits = BatchLimits(max_batch_items=1, max_queue_items=max_queue_items)
        self.is_on_loop = config.executor == "loop"
        self.batchers = [
            MicroBatcher(self._run_batch, limits, cost=lambda r: r.num_rows, on_batch=on_batch,
                         name=f"inferd-tabular-{model_name}-v{version}-{i}", use_worker_thread=not self.is_on_loop)  # fmt: skip
            for i in range(1 if self.is_on_loop else config.instance_count)
        ]
        self.flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None

    def schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Loop executor: run what is queued once the callbacks ready now (other requests' handlers) have run;
        a batch waiting out max_queue_delay runs as soon as it is full or reaches a preferred size."""
        handle = self.flush_handle
        if handle is None:
            self.flush_handle = loop.call_soon(self._flush, loop)
        elif isinstance(handle, asyncio.TimerHandle) and self._may_run_now():
            handle.cancel()
            self.flush_handle = loop.call_soon(self._flush, loop)

    def _may_run_now(self) -> bool:
        batcher = self.batchers[0]
        limits = batcher.limits
        num_rows = batcher.num_queued_cost
        return (
            batcher.num_queued_items >= limits.max_batch_items
            or (limits.max_batch_cost is not None and num_rows >= limits.max_batch_cost)
            or num_rows in limits.preferred_batch_costs
        )

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flush_handle = None
        wait_s = self.batchers[0].run_ready()
        if wait_s is not None:
            self.flush_handle = loop.call_later(wait_s, self._flush, loop)

    def drain_on_caller(self, timeout_s: float) -> None:
        """Loop executor at shutdown: run everything queued now, waiting out max_queue_delay if need be."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            wait_s = self.batchers[0].run_ready()
            if wait_s is None:
                return
            time.sleep(min(wait_s, max(0.0, deadline - time.monotonic())))

    def _run_batch(self, requests: list[_Request]) -> list[dict[str, np.ndarray]]:
        if len(requests) == 1:
            feeds = requests[0].feeds
        else:
            feeds = {name: np.concatenate([r.feeds[name] for r in requests], axis=0) for name in requests[0].feeds}
        outputs = self.session.run(self.output_names, feeds)
        if len(requests) == 1:
            return [dict(zip(self.output_names, outputs))]
        results: list[dict[str, np.ndarray]] = []
        row = 0
        for request in requests:
            end = row + request.num_rows
            results.append({name: out[row:end] for name, out in zip(self.output_names, outputs)})
            row = end
        return results

    def batcher(self) -> MicroBatcher:
        if len(self.batchers) == 1:
            return self.batchers[0]
        return min(self.batchers, key=lambda b: b.num_queued_cost)

    @property
    def is_ready(self) -> bool:
        return all(b.is_running for b in self.batchers)


class _Delivery:
    """Hands finished futures from batcher threads to one event loop, waking it once per burst (a batch of 64
    finishes with one call_soon_threadsafe, not 64 as asyncio.wrap_future would make)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._loop_thread_id = threading.get_ident()  # created on the loop
        self._lock = threading.Lock()
        self._done: list[tuple[concurrent.futures.Future, asyncio.Future]] = []
        self._is_wake_scheduled = False

    def watch(self, future: concurrent.futures.Future) -> asyncio.Future:
        waiter = self.loop.create_future()
        future.add_done_callback(lambda f: self._on_done(f, waiter))
        return waiter

    def _on_done(self, future: concurrent.futures.Future, waiter: asyncio.Future) -> None:  # any thread
        if threading.get_ident() == self._loop_thread_id:  # the loop executor ran the batch: no hop needed
            self._settle(future, waiter)
            return
        with self._lock:
            self._done.append((future, waiter))
            must_wake = not self._is_wake_scheduled
            self._is_wake_scheduled = True
        if must_wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _deliver(self) -> None:  # on the loop
        with self._lock:
            done, self._done = self._done, []
            self._is_wake_scheduled = False
        for future, waiter in done:
            self._settle(future, waiter)

    @staticmethod
    def _settle(future: concurrent.futures.Future, waiter: asyncio.Future) -> None:
        if waiter.done():
            return
        if future.cancelled():
            waiter.cancel()
        elif (error := future.exception()) is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(future.result())


class TabularEngine:
    kind = ModelKind.TABULAR

    def __init__(self, name: str, versions: dict[int, _Version]) -> None:
        self.name = name
        self._versions = versions
        self._pending: set[concurrent.futures.Future] = set()
        self._by_request_id: dict[str, list[concurrent.futures.Future]] = {}
        self._lock = threading.Lock()
        self._is_started = False
        self._is_stopping = False
        self._deliveries: dict[asyncio.AbstractEventLoop, _Delivery] = {}

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_path(
        cls, path: str, options: Mapping[str, Any], *, on_batch: Callable[[BatchRecord], None] | None = None
    ) -> TabularEngine:
        """Load every version the version policy selects. ValueError for a bad option, config or model file."""
        checked = _validate_options(options)
        directory = read_model_directory(path)
        policy = directory.config.version_policy if directory.config else VersionPolicy()
        selected = policy.select(list(directory.version_paths))
        if not selected:
            raise ValueError(f"{path}: the version policy selects none of the versions {sorted(directory.version_paths)}")
        versions: dict[int, _Version] = {}
        for version in selected:
            model_path = directory.version_paths[version]
            base_config = directory.config
            intra_op_threads = checked.get("intra_op_threads") or (base_config.intra_op_threads if base_config else 0) or 1
            device = checked.get("device", "auto")
            if base_config is not None and base_config.instance_kind == "KIND_CPU" and "device" not in checked:
                device = "cpu"
            session = OnnxSession(
                _load_model_bytes(model_path),
                device=device,
                intra_op_threads=intra_op_threads,
                inter_op_threads=base_config.inter_op_threads if base_config else 0,
            )
            config = complete_config(base_config, directory.name, session.inputs, session.outputs)
            config = _apply_options(config, checked)
            config = complete_config(config, directory.name, session.inputs, session.outputs)  # re-check overrides
            versions[version] = _Version(
                version, config, session, checked.get("max_queue_items", DEFAULT_MAX_QUEUE_ITEMS), on_batch, directory.name
            )
            logger.info("tabular model %r version %d from %s on %s", directory.name, version, model_path, session.providers)
        return cls(directory.name, versions)

    # ------------------------------------------------------------------------------------------ ServedEngine

    def start(self) -> None:
        for version in self._versions.values():
            for batcher in version.batchers:
                batcher.start()
        self._is_started = True

    def shutdown(self) -> None:
        """Stop taking requests, let those already queued finish (up to SHUTDOWN_DRAIN_TIMEOUT_S), then stop."""
        with self._lock:
            self._is_stopping = True
            pending = list(self._pending)
        for version in self._versions.values():
            if version.is_on_loop:
                version.drain_on_caller(SHUTDOWN_DRAIN_TIMEOUT_S)
        if pending:
            concurrent.futures.wait(pending, timeout=SHUTDOWN_DRAIN_TIMEOUT_S)
        for version in self._versions.values():
            for batcher in version.batchers:
                batcher.shutdown()

    @property
    def is_running(self) -> bool:
        return self._is_started and not self._is_stopping and all(v.is_ready for v in self._versions.values())

    def abort(self, request_id: str) -> None:
        with self._lock:
            futures = self._by_request_id.pop(request_id, [])
        for future in futures:
            future.cancel()

    def get_stats(self) -> dict[str, Any]:
        return {
            "versions": {
                version: {
                    "num_queued_items": sum(b.num_queued_items for b in v.batchers),
                    "num_batches": sum(b.num_batches for b in v.batchers),
                    "num_items_run": sum(b.num_items_run for b in v.batchers),
                }
                for version, v in self._versions.items()
            }
        }

    # ------------------------------------------------------------------------------------------ model facts

    @property
    def versions(self) -> list[int]:
        return sorted(self._versions)

    def is_version_ready(self, version: int) -> bool:
        v = self._versions.get(version)
        return v is not None and self._is_started and not self._is_stopping and v.is_ready

    def config(self, version: int | None = None) -> ModelConfig:
        return self._version(version).config

    def _version(self, version: int | None) -> _Version:
        if version is None:
            return self._versions[max(self._versions)]
        v = self._versions.get(version)
        if v is None:
            raise TensorError(f"model {self.name!r} has no version {version}; served versions: {self.versions}", status=404)
        return v

    # ------------------------------------------------------------------------------------------ infer

    def _delivery(self) -> _Delivery:
        loop = asyncio.get_running_loop()
        delivery = self._deliveries.get(loop)
        if delivery is None:
            delivery = self._deliveries[loop] = _Delivery(loop)
        return delivery

    def prepare(self, inputs: Mapping[str, np.ndarray], version: int | None = None) -> tuple[_Version, _Request]:
        """Check a request's tensors against the config; TensorError (400/404) naming the input otherwise."""
        v = self._version(version)
        config = v.config
        extra = [name for name in inputs if config.input(name) is None]
        if extra:
            raise TensorError(f"unexpected input(s) {extra}; model {self.name!r} takes {[t.name for t in config.inputs]}")
        missing = [t.name for t in config.inputs if t.name not in inputs and not t.is_optional]
        if missing:
            raise TensorError(f"missing input(s) {missing} for model {self.name!r}")
        has_batch_dim = config.max_batch_size > 0
        num_rows = None
        feeds: dict[str, np.ndarray] = {}
        for tensor in config.inputs:
            array = inputs.get(tensor.name)
            if array is None:
                continue
            datatype = oip_datatype_of(array)
            if datatype != tensor.datatype:
                raise TensorError(f"input {tensor.name!r}: datatype {datatype} given, the model takes {tensor.datatype}")
            shape = array.shape
            expected = ((-1,) if has_batch_dim else ()) + tensor.dims
            shape_text = list(expected)
            if len(shape) != len(expected) or any(e != -1 and s != e for s, e in zip(shape, expected)):
                raise TensorError(f"input {tensor.name!r}: shape {list(shape)} does not match the model's {shape_text}")
            if has_batch_dim:
                rows = shape[0]
                if rows < 1 or rows > config.max_batch_size:
                    raise TensorError(
                        f"input {tensor.name!r}: batch size {rows} is outside [1, max_batch_size {config.max_batch_size}]"
                    )
                if num_rows is not None and rows != num_rows:
                    raise TensorError(f"input {tensor.name!r}: batch size {rows} differs from the other inputs' {num_rows}")
                num_rows = rows
            if not config.allow_nan and array.dtype.kind == "f" and bool(np.isnan(array).any()):
                raise TensorError(f"input {tensor.name!r}: NaN is not allowed by model {self.name!r} (allow_nan false)")
            if tensor.model_dims is not None:
                array = array.reshape(((rows,) if has_batch_dim else ()) + tensor.model_dims)
            feeds[tensor.name] = array
        return v, _Request(feeds, num_rows if num_rows is not None else 1)

    def check_outputs(self, output_names: Sequence[str] | None, version: int | None = None) -> list[str]:
        config = self._version(version).config
        if output_names is None:
            return [t.name for t in config.outputs]
        unknown = [name for name in output_names if config.output(name) is None]
        if unknown:
            raise TensorError(f"unknown output(s) {unknown}; model {self.name!r} gives {[t.name for t in config.outputs]}")
        return list(output_names)

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        version: int | None = None,
        output_names: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        """Score one request (TensorError for bad input; QueueFullError / BatcherStoppedError from the batcher)."""
        v, request = self.prepare(inputs, version)
        names = self.check_outputs(output_names, version)
        if self._is_stopping:
            raise BatcherStoppedError(f"model {self.name!r} is unloading")
        future = v.batcher().submit(request)
        delivery = self._delivery()
        if v.is_on_loop:
            v.schedule_flush(delivery.loop)
        with self._lock:
            self._pending.add(future)
            if request_id is not None:
                self._by_request_id.setdefault(request_id, []).append(future)
        try:
            outputs = await delivery.watch(future)
        except BaseException:
            future.cancel()
            raise
        finally:
            with self._lock:
                self._pending.discard(future)
                if request_id is not None:
                    self._by_request_id.pop(request_id, None)
        config = v.config
        result: dict[str, np.ndarray] = {}
        for name in names:
            array = outputs[name]
            tensor = config.output(name)
            if tensor is not None and tensor.model_dims is not None:
                lead = (request.num_rows,) if config.max_batch_size > 0 else ()
                array = array.reshape(lead + tensor.dims)
            result[name] = array
        return InferResult(v.version, result)

