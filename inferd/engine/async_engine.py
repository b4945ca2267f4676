"""Layer 4: an asyncio face on the synchronous LLMEngine.

One background thread owns the engine (it is not thread-safe) and runs the step loop; torch releases the GIL
inside its kernels, so the event loop keeps serving HTTP while a step runs. The two sides talk through:
  - a command deque (add / abort), appended from the event loop, drained by the loop thread at the top of
    every step; a threading.Event wakes the thread when it is idle (no busy spin);
  - one `loop.call_soon_threadsafe` per step that hands every output of that step to its request's
    asyncio queue (one cross-thread hop per step, not per request or per token).
A request whose consumer stops (client disconnect -> CancelledError / aclose) is aborted at once, which frees
its KV blocks at the loop thread's next iteration.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from inferd.request import RequestOutput, SamplingParams
from inferd.serving import ModelKind

logger = logging.getLogger("inferd.engine")


class EngineDeadError(RuntimeError):
    """The loop thread is not running (shut down, or never started)."""


class RequestError(RuntimeError):
    """The engine failed while running this request (a bug or a device error); the server stays up."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float | None


@dataclass
class _Abort:
    request_id: str


_ACCEPTED = object()  # first item of a request's queue once the engine took it
# After this long with nothing to run, the loop thread gives freed heap memory back to the OS (once per busy spell):
# long enough that a stream of requests never pays for it, short enough that an idle server shows its idle RSS.
IDLE_HEAP_TRIM_DELAY_S = 2.0


class RequestStream:
    """The outputs of one engine request, in order; `aclose()` before the end aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.is_finished = False
        self._is_closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.is_finished or self._is_closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._close_without_abort()
            raise item
        if item.finished:
            self.is_finished = True
            self._close_without_abort()
        return item

    async def aclose(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._engine._forget(self.request_id)
        if not self.is_finished:
            self._engine.abort(self.request_id)

    def _close_without_abort(self) -> None:
        self._is_closed = True
        self._engine._forget(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncEngine:
    """The `generate` kind of `inferd.serving.ServedEngine`."""

    kind = ModelKind.GENERATE

    def __init__(self, engine: Any) -> None:
        """`engine`: an LLMEngine (add_request, abort_request, step, has_unfinished_requests, get_stats)."""
        self.engine = engine
        self._commands: collections.deque[_Add | _Abort] = collections.deque()
        self._wakeup = threading.Event()
        self._is_stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Owned by the event loop thread.
        self._streams: dict[str, RequestStream] = {}
        # Shared under _lock: the latest stats snapshot and the adds not yet visible in it.
        self._lock = threading.Lock()
        self._stats: Any = None
        self._num_unpublished_adds = 0
        self.num_heap_releases = 0  # idle spells after which freed heap memory went back to the OS

    @classmethod
    def from_path(cls, path: str, options: Mapping[str, Any] | None = None, *, on_batch: Any = None) -> AsyncEngine:
        """Load an LLM from a local path; `options` are EngineArgs fields (unknown keys -> ValueError listing them).
        `on_batch` is accepted for the model-table loader's uniform signature; LLM steps report through stats."""
        from inferd.config import EngineArgs
        from inferd.engine.llm_engine import LLMEngine

        options = dict(options or {})
        unknown = sorted(set(options) - EngineArgs.field_names() - {"model"})
        if unknown:
            raise ValueError(f"options: unknown LLM option(s) {unknown}; known: {sorted(EngineArgs.field_names() - {'model'})}")
        return cls(LLMEngine.from_engine_args(EngineArgs(**{**options, "model": path})))

    @property
    def config(self) -> Any:
        return self.engine.config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def grammar_compiler(self) -> Any:
        """The engine's GrammarCompiler: thread-safe, so the server compiles constraints off the event loop."""
        return self.engine.grammar_compiler

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._is_stopping

    def start(self) -> None:
        """Start the loop thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._stats = self.engine.get_stats()
        self._thread = threading.Thread(target=self._run_loop, name="inferd-engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort everything still running and stop the loop thread."""
        if self._thread is None:
            return
        for request_id in list(self._streams):
            self.abort(request_id)
        self._is_stopping = True
        self._wakeup.set()
        self._thread.join(timeout_s)
        for stream in list(self._streams.values()):
            stream._queue.put_nowait(EngineDeadError("engine shut down"))
        self._streams.clear()

    def has_requests_in_flight(self) -> bool:
        """True while any request is queued or running (keep-alive never unloads a busy model)."""
        return bool(self._streams)

    def fail_all(self, message: str) -> int:
        """End every request in flight with RequestError(message) (streams then send an error event), aborting it in
        the engine; e.g. when the drain after SIGTERM runs out of time. Returns how many were failed."""
        streams = list(self._streams.items())
        for request_id, stream in streams:
            self.abort(request_id)
            stream._queue.put_nowait(RequestError(message))
        return len(streams)

    # ---- event-loop side -------------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it (at most one step).

        Raises the engine's ValueError for invalid input, so a server can answer 400 before streaming starts.
        """
        if not self.is_running:
            raise EngineDeadError("engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        with self._lock:
            self._num_unpublished_adds += 1
        self._commands.append(_Add(request_id, prompt, params, arrival_time))
        self._wakeup.set()
        try:
            first = await stream._queue.get()
        except BaseException:
            await stream.aclose()
            raise
        if isinstance(first, BaseException):
            stream._close_without_abort()
            raise first
        assert first is _ACCEPTED
        return stream

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; stopping early (break, cancel, aclose) aborts it."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        async with stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        self._commands.append(_Abort(request_id))
        self._wakeup.set()

    def num_waiting_requests(self) -> int:
        """Requests not yet running: the engine's waiting queue plus adds the loop thread has not published."""
        with self._lock:
            num_waiting = self._stats.num_waiting if self._stats is not None else 0
            return num_waiting + self._num_unpublished_adds

    def latest_stats(self) -> Any:
        """The engine's stats as of the end of its latest step (or of the latest abort when idle)."""
        with self._lock:
            return self._stats

    get_stats = latest_stats  # the ServedEngine protocol's name

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """Runs on the event loop: route one step's outputs (or errors) to their streams."""
        streams = self._streams
        for request_id, item in items:
            stream = streams.get(request_id)
            if stream is not None:
                stream._queue.put_nowait(item)

    # ---- loop-thread side ------------------------------------------------------------------------------

    def _cpu_threads(self) -> Any:
        """This loop thread's CpuThreadHolder when the model runs on CPU (it then shares the CPUs with any other
        model of this process that computes at the same time); None on a GPU."""
        config = getattr(self.engine, "config", None)
        if getattr(config, "device", None) != "cpu":
            return None
        from inferd.device import CPU_THREADS

        return CPU_THREADS.register()

    def _run_loop(self) -> None:
        assert self._loop is not None
        cpu_threads = self._cpu_threads()
        try:
            self._run_steps(cpu_threads)
        finally:
            if cpu_threads is not None:
                cpu_threads.close()

    def _run_steps(self, cpu_threads: Any) -> None:
        assert self._loop is not None
        live_request_ids: set[str] = set()
        has_stepped_since_trim = False
        while not self._is_stopping:
            self._wakeup.clear()
            items: list[tuple[str, Any]] = []
            num_commands = len(self._commands)
            num_applied_adds = 0
            for _ in range(num_commands):
                command = self._commands.popleft()
                if isinstance(command, _Add):
                    num_applied_adds += 1
                    items.append((command.request_id, self._apply_add(command, live_request_ids)))
                elif command.request_id in live_request_ids:
                    live_request_ids.discard(command.request_id)
                    self._call_engine_quietly(self.engine.abort_request, command.request_id)

            if live_request_ids and self.engine.has_unfinished_requests():
                try:
                    if cpu_threads is not None:
                        cpu_threads.claim()
                    try:
                        has_stepped_since_trim = True
                        outputs = self.engine.step()
                    finally:
                        if cpu_threads is not None:
                            cpu_threads.release()
                except Exception as exc:
                    logger.exception("engine step failed; failing %d request(s)", len(live_request_ids))
                    for request_id in live_request_ids:
                        self._call_engine_quietly(self.engine.abort_request, request_id)
                        items.append((request_id, RequestError(f"engine step failed: {type(exc).__name__}: {exc}")))
                    live_request_ids.clear()
                    outputs = []
                for output in outputs:
                    items.append((output.request_id, output))
                    if output.finished:
                        live_request_ids.discard(output.request_id)
                for request_id, message in self._pop_failed_requests():
                    if request_id in live_request_ids:
                        live_request_ids.discard(request_id)
                        items.append((request_id, RequestError(message)))
            elif live_request_ids:
                # The engine finished them without an output we saw (should not happen); release the waiters.
                for request_id in live_request_ids:
                    items.append((request_id, RequestError("engine dropped the request")))
                live_request_ids.clear()

            if items or num_commands:
                self._publish_stats(num_applied_adds)
            if items:
                self._loop.call_soon_threadsafe(self._deliver, items)
            if not live_request_ids and not self._commands:
                if has_stepped_since_trim:
                    if self._wakeup.wait(timeout=IDLE_HEAP_TRIM_DELAY_S):
                        continue  # work arrived within the delay
                    self._release_heap()
                    has_stepped_since_trim = False
                self._wakeup.wait()

    def _release_heap(self) -> None:
        from inferd.device import release_free_heap_memory

        release_free_heap_memory()
        self.num_heap_releases += 1

    def _pop_failed_requests(self) -> list[tuple[str, str]]:
        """Requests the engine failed alone (their own data broke sampling or output): each gets its error."""
        pop = getattr(self.engine, "pop_failed_requests", None)
        return pop() if pop is not None else []

    def _apply_add(self, command: _Add, live_request_ids: set[str]) -> Any:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, arrival_time=command.arrival_time)
        except Exception as exc:  # ValueError for bad input; anything else still must reach the caller
            return exc
        live_request_ids.add(command.request_id)
        return _ACCEPTED

    def _publish_stats(self, num_applied_adds: int) -> None:
        try:
            stats = self.engine.get_stats()
        except Exception:
            logger.exception("engine.get_stats failed")
            stats = self._stats
        with self._lock:
            self._stats = stats
            self._num_unpublished_adds -= num_applied_adds

    @staticmethod
    def _call_engine_quietly(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("%s%r failed", getattr(fn, "__name__", fn), args)
