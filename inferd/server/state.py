"""Layer 5: what every route of one app shares: options, the model table, metrics, drain state.

The model table maps a served name to a `ServedModel`: its spec (resolved path, kind, options), its engine (any
`inferd.serving.ServedEngine`) once loaded, and its status. Routes find their model with
`state.get_model(body.model, kind)`, which answers 404 (unknown name, listing the served ones), 400 (a model of
another kind) or 503 (loading, failed, unloaded) itself.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferd.serving import ModelKind, ModelSpec, ServedEngine
from inferd.server.errors import APIError, InvalidParameter
from inferd.server.metrics import FinishedRequestStats, LLMMetrics, ServerMetrics
from inferd.server.response_cache import DEFAULT_RESPONSE_CACHE_BYTES, ResponseCache

logger = logging.getLogger("inferd.server")
request_logger = logging.getLogger("inferd.requests")

# The guard middleware stamps each HTTP request's arrival (time.monotonic()) into its ASGI scope under this key.
ARRIVAL_TIME_SCOPE_KEY = "inferd.arrival_time"
DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_QUEUE = 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_BODY_READ_TIMEOUT_S = 30.0
# Logprobs must be JSON numbers; -inf (an impossible token) is reported as this, as OpenAI-compatible servers do.
MIN_LOGPROB = -9999.0

# What each kind of route serves, for the wrong-kind error.
_KIND_ROUTES = {
    ModelKind.GENERATE: "chat/completions and completions",
    ModelKind.EMBED: "embeddings",
    ModelKind.TABULAR: "Open Inference Protocol inference (/v2/models/{name}/infer)",
}


@dataclass(frozen=True)
class ServerOptions:
    api_keys: tuple[str, ...] = ()  # accepted bearer keys; empty = no key needed
    metrics_require_key: bool = False
    body_read_timeout_s: float = DEFAULT_BODY_READ_TIMEOUT_S
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting (not yet running) beyond this get 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    retry_after_s: int = 1
    # Engine flags every `generate` model starts from (the CLI's --device, --quantization, ...); a models-file
    # entry's options override them for that model.
    llm_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Seconds a model may sit idle before it is unloaded (its memory freed); the next request loads it again and
    # waits for it. None: models stay loaded. A models-file entry's `keep_alive` option overrides it per model.
    keep_alive_s: float | None = None
    model_repository: str | None = None  # --model-repository: OIP's repository index/load reads it
    grpc_port: int | None = None  # --grpc-port: OIP v2 over gRPC (server/grpc_oip.py) on grpc_host:grpc_port
    grpc_host: str = "127.0.0.1"
    # --response-cache-bytes: the exact response cache's bound (server/response_cache.py); 0 turns it off.
    response_cache_bytes: int = DEFAULT_RESPONSE_CACHE_BYTES


def _load_generate(spec: ModelSpec, options: Mapping[str, Any], on_batch: Any) -> ServedEngine:
    from inferd.engine.async_engine import AsyncEngine

    return AsyncEngine.from_path(spec.source, options, on_batch=on_batch)


def _load_embed(spec: ModelSpec, options: Mapping[str, Any], on_batch: Any) -> ServedEngine:
    from inferd.embeddings import AsyncEmbedEngine

    return AsyncEmbedEngine.from_path(spec.source, options, on_batch=on_batch)


def _load_tabular(spec: ModelSpec, options: Mapping[str, Any], on_batch: Any) -> ServedEngine:
    from inferd.tabular import TabularEngine

    return TabularEngine.from_path(spec.source, options, on_batch=on_batch)


# The loader of each kind, run on a loading thread: (spec, options, on_batch) -> an engine not yet started.
ENGINE_LOADERS: dict[ModelKind, Callable[[ModelSpec, Mapping[str, Any], Any], ServedEngine]] = {
    ModelKind.GENERATE: _load_generate,
    ModelKind.EMBED: _load_embed,
    ModelKind.TABULAR: _load_tabular,
}


class ServedModel:
    """One row of the model table."""

    def __init__(self, spec: ModelSpec, metrics: ServerMetrics) -> None:
        assert spec.kind is not None, "specs reach the server resolved"
        self.spec = spec
        self.kind: ModelKind = spec.kind
        self.engine: Any = None  # a ServedEngine once loaded
        self.status = "loading"  # loading | ready | failed | unloaded | idle (unloaded by keep-alive; loads on use)
        self.load_error: str | None = None
        self.load_time_s: float | None = None
        self.llm_metrics: LLMMetrics | None = metrics.llm(spec.name) if spec.kind is ModelKind.GENERATE else None
        self._token_texts: dict[int, str] = {}
        self.keep_alive_s: float | None = None  # set by the state from the options (None: never unloaded)
        self.last_used_time = time.monotonic()
        self.loaded_event = asyncio.Event()  # set while the model is ready or has failed; cleared while loading

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_ready(self) -> bool:
        """Ready to take requests now, or asleep after its keep-alive (the next request loads it again)."""
        if self.status == "idle" or (self.status == "loading" and self.load_time_s is not None):
            return True  # asleep after its keep-alive, or waking up: requests wait for it instead of failing
        return self.status == "ready" and self.engine is not None and self.engine.is_running

    def is_idle_for(self, now: float) -> float:
        """Seconds since its last request, 0 while any request is in flight (LLMs: running or waiting)."""
        is_busy = getattr(self.engine, "has_requests_in_flight", None)
        if is_busy is not None and is_busy():
            return 0.0
        return now - self.last_used_time

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (special tokens kept), cached per id (generate models)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def describe(self) -> dict[str, Any]:
        status = "stopped" if self.status == "ready" and not self.is_ready else self.status
        entry: dict[str, Any] = {"kind": self.kind.value, "status": status}
        if self.load_error is not None:
            entry["error"] = self.load_error
        return entry


class ServerState:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = ServerMetrics()
        self.response_cache = ResponseCache(options.response_cache_bytes, self.metrics)
        self.models: dict[str, ServedModel] = {}
        self.is_draining = False
        self.num_in_flight = 0  # HTTP requests inside the app (streams count until their last byte)
        self.on_load_failure: Callable[[str], None] | None = None

    # ------------------------------------------------------------------------------------------ the table

    @property
    def is_ready(self) -> bool:
        return bool(self.models) and all(m.is_ready for m in self.models.values()) and not self.is_draining

    async def use_model(self, name: str | None, kind: ModelKind) -> ServedModel:
        """`get_model`, except that a model unloaded by its keep-alive is loaded again first (the request waits,
        as with Ollama, rather than getting a 503), and the model's idle clock restarts."""
        served = self._find(name, kind)
        if served.status == "idle":
            await self.load_model(served.spec)
        elif served.status == "loading" and served.load_time_s is not None:  # a reload already under way
            await served.loaded_event.wait()
        served.last_used_time = time.monotonic()
        return self.get_model(name, kind)

    def apply_keep_alive(self, served: ServedModel, keep_alive: str | float | None) -> None:
        """A request's `keep_alive` (Ollama's semantics): from now on the model is unloaded once idle that long
        (0: as soon as it is idle; negative: never). None leaves the model's keep-alive as it is."""
        if keep_alive is None:
            return
        try:
            served.keep_alive_s = parse_duration_s(keep_alive, "keep_alive")
        except ValueError as exc:
            raise InvalidParameter("keep_alive", str(exc)) from None

    def get_model(self, name: str | None, kind: ModelKind) -> ServedModel:
        """The ready model a request names (None: the only model of that kind), or the APIError that explains."""
        served = self._find(name, kind)
        if served.status == "loading":
            raise APIError(503, f"model {served.name!r} is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "1"})
        if served.status == "failed":
            raise APIError(503, f"model {served.name!r} failed to load: {served.load_error}", code="model_load_failed")
        if served.status in ("unloaded", "idle"):
            raise APIError(503, f"model {served.name!r} is unloaded; load it again first", code="model_unloaded")
        if not served.engine.is_running:
            raise APIError(503, f"the engine of model {served.name!r} is not running", code="engine_stopped")
        served.last_used_time = time.monotonic()
        return served

    def _find(self, name: str | None, kind: ModelKind) -> ServedModel:
        if self.is_draining:
            raise APIError(503, "server is shutting down", code="shutting_down")
        if name is None:
            of_kind = [m for m in self.models.values() if m.kind is kind]
            if len(of_kind) != 1:
                raise InvalidParameter("model", f"model is required: this server serves {self._names_by_kind()}")
            served = of_kind[0]
        else:
            served = self.models.get(name)
            if served is None:
                raise APIError(
                    404, f"model {name!r} does not exist; served models: {self._names_by_kind()}",
                    param="model", code="model_not_found",
                )
        if served.kind is not kind:
            raise InvalidParameter(
                "model",
                f"model {served.name!r} is a {served.kind.value} model; this route needs a {kind.value} model "
                f"(it serves {_KIND_ROUTES[served.kind]})",
                code="wrong_model_kind",
            )
        return served

    def _names_by_kind(self) -> str:
        return ", ".join(f"{name!r} ({m.kind.value})" for name, m in self.models.items()) or "none"

    def add_models(self, specs: list[ModelSpec]) -> list[ServedModel]:
        added = []
        for spec in specs:
            if spec.name in self.models:
                raise ValueError(f"model name {spec.name!r} is served already")
            served = ServedModel(spec, self.metrics)
            keep_alive = spec.options.get("keep_alive", self.options.keep_alive_s)
            served.keep_alive_s = None if keep_alive is None else parse_duration_s(keep_alive, "keep_alive")
            added.append(served)
            self.models[spec.name] = served
        return added

    def add_loaded_engine(self, spec: ModelSpec, engine: Any) -> ServedModel:
        """Put an engine that is already loaded into the table and start it (tests, benchmarks)."""
        (served,) = self.add_models([spec])
        self._start(served, engine)
        return served

    async def load_model(self, spec: ModelSpec, *, is_startup: bool = False) -> ServedModel:
        """Load (or reload) a model on a loading thread, then start it; returns its row, ready or failed. A startup
        load that fails calls `on_load_failure` (the CLI server then exits 1); a later one leaves the row failed."""
        served = self.models.get(spec.name)
        if served is None:
            (served,) = self.add_models([spec])
        else:
            if served.engine is not None:
                served.engine.shutdown()
            served.spec, served.engine, served.status, served.load_error = spec, None, "loading", None
        served.loaded_event.clear()
        started = time.monotonic()
        options = {k: v for k, v in spec.options.items() if k != "keep_alive"}
        if served.kind is ModelKind.GENERATE:
            options = {**self.options.llm_defaults, **options, "served_model_name": spec.name}
        kind = served.kind

        def on_batch(record: Any) -> None:
            self.metrics.observe_batch(spec.name, kind, record)

        try:
            engine = await _run_in_daemon_thread(ENGINE_LOADERS[kind], spec, options, on_batch)
        except Exception as exc:
            served.status, served.load_error = "failed", f"{type(exc).__name__}: {exc}"
            served.loaded_event.set()
            logger.error("model %s failed to load: %s", spec.name, served.load_error, exc_info=exc)
            if is_startup and self.on_load_failure is not None:
                self.on_load_failure(spec.name)
            return served
        self._start(served, engine)
        served.load_time_s = time.monotonic() - started
        self.metrics.observe_model_load(spec.name, served.load_time_s)
        logger.info("model %s (%s) ready in %.1f s", spec.name, kind.value, served.load_time_s)
        return served

    def _start(self, served: ServedModel, engine: Any) -> None:
        engine.start()
        served.engine = engine
        served.status = "ready"
        served.last_used_time = time.monotonic()
        served.loaded_event.set()
        self.metrics.set_model_loaded(served.name, True)

    async def unload_idle_models(self) -> list[str]:
        """Unload every ready model idle for longer than its keep-alive; returns their names."""
        now = time.monotonic()
        unloaded = []
        for served in list(self.models.values()):
            if served.keep_alive_s is None or served.status != "ready" or served.engine is None:
                continue
            idle_s = served.is_idle_for(now)
            if idle_s > 0 and idle_s >= served.keep_alive_s:  # 0: requests in flight (keep_alive 0 must wait them)
                await self._unload(served, "idle")
                logger.info("model %s unloaded after %.0f s idle (keep-alive); the next request loads it again",
                            served.name, now - served.last_used_time)
                unloaded.append(served.name)
        return unloaded

    async def _unload(self, served: ServedModel, status: str) -> None:
        engine, served.engine = served.engine, None
        served.status = status
        served._token_texts.clear()
        self.metrics.set_model_loaded(served.name, False)
        if engine is not None:
            await asyncio.to_thread(_shutdown_and_free, engine)

    async def unload_model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"model {name!r} does not exist; served models: {self._names_by_kind()}",
                           param="model", code="model_not_found")
        await self._unload(served, "unloaded")
        return served

    def fail_in_flight(self, message: str) -> int:
        """End every generate request still running with an error (streams close with an error event and [DONE])."""
        num_failed = 0
        for served in self.models.values():
            if served.engine is not None and hasattr(served.engine, "fail_all"):
                num_failed += served.engine.fail_all(message)
        return num_failed

    def shutdown(self) -> None:
        for served in self.models.values():
            if served.engine is not None:
                served.engine.shutdown()

    # ------------------------------------------------------------------------------------------ requests

    def check_queue(self, engine: Any, num_new_requests: int, param: str = "prompt") -> None:
        """429 + Retry-After when the queue is busy now; 400 naming `param` when the request could never fit."""
        if num_new_requests > self.options.max_queue:
            raise InvalidParameter(
                param, f"{param}: this request adds {num_new_requests} sequences but the server queues at most "
                       f"{self.options.max_queue} (max_queue); send fewer per request",
            )
        num_waiting = engine.num_waiting_requests()
        if num_waiting + num_new_requests > self.options.max_queue:
            raise APIError(
                429,
                f"server is busy: {num_waiting} requests are waiting (max_queue {self.options.max_queue}); retry later",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.options.retry_after_s)},
            )

    def record_request(
        self, served: ServedModel, request_id: str, stats: FinishedRequestStats, status: str, duration_s: float
    ) -> None:
        assert served.llm_metrics is not None
        served.llm_metrics.observe_finished_request(stats)
        log_request(served.name, request_id, stats, status, duration_s)

    def refresh_engine_metrics(self) -> None:
        """Copy every LLM engine's latest stats into its gauges and counters (before /metrics renders)."""
        for served in self.models.values():
            if served.llm_metrics is not None and served.engine is not None:
                stats = served.engine.get_stats()
                if stats is not None:
                    served.llm_metrics.set_engine_stats(stats)


def _shutdown_and_free(engine: Any) -> None:
    engine.shutdown()
    del engine
    gc.collect()  # weights and KV-cache tensors are freed once nothing refers to them


def is_bearer_authorized(authorization: bytes | None, api_keys: Sequence[bytes]) -> bool:
    """`Authorization: Bearer KEY` (the scheme in any case, RFC 7235) against every key, each compared in constant
    time and all of them compared, so timing says nothing about which key nearly matched. The HTTP guard and the
    gRPC service both ask this."""
    token = b""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
    is_match = False
    for key in api_keys:
        is_match |= hmac.compare_digest(token, key)
    return is_match


def parse_duration_s(value: str | float | int, field_name: str) -> float | None:
    """'5m' -> 300.0, '30s' / 30 -> 30.0, '1h' -> 3600.0, '-1' / 'forever' -> None (never unload)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("-1", "forever", "inf", "never"):
            return None
        units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "s")
        number = text[: -len(unit)] if text.endswith(unit) else text
        try:
            seconds = float(number) * units[unit]
        except ValueError:
            raise ValueError(f"{field_name}: cannot read {value!r} as a duration (examples: 30s, 5m, 1h, -1)") from None
    if seconds < 0:
        return None
    return seconds


def _run_in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """fn(*args) on a daemon thread (a shutdown during loading must not wait for it), awaited on this loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the event loop
            loop.call_soon_threadsafe(settle, None, exc)
            return
        loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="inferd-model-load", daemon=True).start()
    return future


def log_request(model_name: str, request_id: str, stats: FinishedRequestStats, status: str, duration_s: float) -> None:
    """One JSON line per request (to the `inferd.requests` logger)."""
    if not request_logger.isEnabledFor(logging.INFO):
        return
    line: dict[str, Any] = {
        "event": "request",
        "id": request_id,
        "model": model_name,
        "status": status,
        "prompt_tokens": stats.num_prompt_tokens,
        "output_tokens": stats.num_generation_tokens,
        "cached_tokens": stats.num_cached_tokens,
        "ttft_s": None if stats.time_to_first_token_s is None else round(stats.time_to_first_token_s, 6),
        "duration_s": round(duration_s, 6),
        "finish_reasons": stats.finish_reasons,
    }
    request_logger.info(json.dumps(line))
