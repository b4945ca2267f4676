"""Layer 5: the FastAPI app and `inferd serve`.

    build_app(options, specs)         the ASGI app over a model table; models load in the background after startup
                                      (/health is 503 until all are ready), or pass `loaded=` engines already loaded
    add_serve_parser(subparsers)      the `serve` subcommand's flags (cli.py wires it and resolves the models)
    serve_main(args, specs) -> int    run uvicorn until SIGTERM/SIGINT; returns the process exit status

Every HTTP request first meets `GuardMiddleware` (a plain ASGI middleware, so streaming is untouched): API key,
drain state, body size (Content-Length and the bytes actually received), UTF-8, and the in-flight count that
SIGTERM's drain waits on.
SIGTERM: new requests get 503, requests in flight (streams included) may finish for up to --drain-timeout
seconds, then the server stops and the process exits 0. A second SIGTERM or a SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
# Imported here, on the main thread before any model loads: binding the socket looks up the "idna" codec, whose
# lazy first import (encodings.idna -> stringprep -> unicodedata) once failed with "unknown encoding: idna" while
# a model-load thread was importing at the same moment (seen in the test suite).
import encodings.idna  # noqa: F401
import gc
import importlib.metadata
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.config import DEFAULT_MODEL, EngineArgs, parse_size_bytes
from inferd.server.errors import error_body, error_response, install_error_handlers
from inferd.server.routes.collections import router as collections_router
from inferd.server.routes.dashboard import DASHBOARD_DATA_PATH, DASHBOARD_PAGE_PATHS
from inferd.server.routes.dashboard import router as dashboard_router
from inferd.server.fast_http import hot_protocol_class
from inferd.server.routes.oip import INFER_PATH_RE, infer_asgi_app, infer_hot_route
from inferd.server.routes.oip import router as oip_router
from inferd.server.routes.openai import router as openai_router
from inferd.server.routes.embeddings import EMBEDDINGS_PATH, embeddings_asgi_app, is_json_content_type
from inferd.server.routes.embeddings import router as embeddings_router
from inferd.server.routes.ops import router as ops_router
from inferd.server.response_cache import DEFAULT_RESPONSE_CACHE_BYTES
from inferd.serving import ModelKind, ModelSpec
from inferd.server.state import (
    ARRIVAL_TIME_SCOPE_KEY,
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    ServerOptions,
    ServerState,
    is_bearer_authorized,
    parse_duration_s,
)

logger = logging.getLogger("inferd.server")

API_KEY_ENV = "INFERD_API_KEY"
# Paths served without an API key and while draining (probes, scrapers, docs, the dashboard's page without its
# data); /metrics and /dashboard/data too unless --metrics-require-key.
_OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect", "/redoc",
                         "/openapi.json"})
_METRICS_PATH = "/metrics"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# A JSON \u escape of a UTF-16 surrogate; a lone one (no high+low pair) is not Unicode text.
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def read_api_keys(keys: Sequence[str] | None, key_file: str | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Every accepted API key: --api-key flags, the lines of --api-key-file (blank lines and # comments skipped),
    and $INFERD_API_KEY (several separated by commas). Keys in a file or the environment stay out of `ps`."""
    found = [k.strip() for k in keys or []]
    if key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"api_key_file: cannot read {key_file}: {exc}") from None
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    found += [k.strip() for k in environ.get(API_KEY_ENV, "").split(",")]
    keys_found = tuple(dict.fromkeys(k for k in found if k))
    if any(any(c.isspace() for c in k) for k in keys_found):
        raise ValueError("api_key: a key must not contain whitespace")
    return keys_found


@dataclass(frozen=True)
class Refusal:
    """A request the guard answers itself: status, message, and the OpenAI error's param/code and extra headers."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None


def _guard_error(scope: Scope, refusal: Refusal) -> JSONResponse:
    """The guard's own errors in the shape the route's clients read: OIP's {"error": "..."} under /v2 (tritonclient
    and KServe clients), OpenAI's everywhere else."""
    if scope["path"] == "/v2" or scope["path"].startswith("/v2/"):
        return JSONResponse({"error": refusal.message}, status_code=refusal.status, headers=refusal.headers)
    return error_response(refusal.status, refusal.message, refusal.param, refusal.code, refusal.headers)


class GuardMiddleware:
    """The checks every request passes before its route, as an ASGI middleware. Its checks are also methods
    (`access_refusal`, `declared_length_refusal`, `too_large`, `text_refusal`) that server/fast_http.py's
    protocol asks for the routes it answers without ASGI, so both paths refuse the same requests the same way."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self._api_keys = tuple(k.encode() for k in state.options.api_keys)
        open_paths = _OPEN_PATHS | DASHBOARD_PAGE_PATHS
        self._open_paths = open_paths if state.options.metrics_require_key else open_paths | {_METRICS_PATH,
                                                                                              DASHBOARD_DATA_PATH}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL_TIME_SCOPE_KEY] = time.monotonic()
        state = self.state
        refusal = self.access_refusal(scope["path"], scope["headers"])
        if refusal is not None:
            await _guard_error(scope, refusal)(scope, receive, send)
            return
        if scope["method"] in _BODY_METHODS:
            body_or_refusal = await self._read_body(scope, receive)
            if body_or_refusal is None:  # the client left while sending
                return
            if isinstance(body_or_refusal, Refusal):
                await _guard_error(scope, body_or_refusal)(scope, receive, send)
                return
            receive = _replay_body(body_or_refusal, receive)
        state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.num_in_flight -= 1

    def access_refusal(self, path: str, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
        """401 without a valid API key, 503 while draining; None for open paths and admitted requests."""
        if path in self._open_paths:
            return None
        if self._api_keys:
            authorization = next((value for name, value in headers if name == b"authorization"), None)
            if not is_bearer_authorized(authorization, self._api_keys):
                return Refusal(401, "missing or incorrect API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if self.state.is_draining:
            return Refusal(503, "server is shutting down", code="shutting_down")
        return None

    def declared_length_refusal(self, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
        """400 for a Content-Length that is not a number, 413 for one over --max-body-bytes."""
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared_bytes = int(value)
                except ValueError:
                    return Refusal(400, "Content-Length is not an integer")
                return self.too_large() if declared_bytes > self.state.options.max_body_bytes else None
        return None

    def too_large(self) -> Refusal:
        return Refusal(413, f"request body is larger than the limit of {self.state.options.max_body_bytes} bytes",
                       code="request_too_large")

    def body_timeout(self) -> Refusal:
        timeout_s = self.state.options.body_read_timeout_s
        return Refusal(408, f"the request body did not arrive within {timeout_s:g} s (declared Content-Length longer "
                            f"than what was sent?)", code="request_timeout", headers={"Connection": "close"})

    async def text_refusal(self, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
        """400 for a body that is not UTF-8 or holds a lone surrogate escape; OIP binary bodies are not text."""
        if any(name == b"inference-header-content-length" for name, _ in headers):
            return None  # OIP binary tensors (routes/oip.py): raw bytes follow a JSON header the route checks
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Refusal(400, f"request body is not valid UTF-8 (invalid byte at offset {exc.start})")
        if _SURROGATE_ESCAPE_RE.search(body) is not None:
            where = await asyncio.to_thread(_lone_surrogate_field, body)
            if where is not None:
                param, path = where
                return Refusal(400, f"{path}: contains a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its "
                                    f"pair), which is not Unicode text", param=param, code="invalid_value")
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | Refusal | None:
        """The whole body (bytes), a refusal, or None if the client disconnected."""
        max_body_bytes = self.state.options.max_body_bytes
        refusal = self.declared_length_refusal(scope["headers"])
        if refusal is not None:
            return refusal
        chunks: list[bytes] = []
        num_bytes = 0
        timeout_s = self.state.options.body_read_timeout_s
        while True:
            try:
                async with asyncio.timeout(timeout_s):  # a timer, not wait_for's extra task per message
                    message = await receive()
            except TimeoutError:
                return self.body_timeout()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            num_bytes += len(chunk)
            if num_bytes > max_body_bytes:  # chunked transfer, or a Content-Length that lied
                return self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        return await self.text_refusal(body, scope["headers"]) or body


def _lone_surrogate_field(body: bytes) -> tuple[str, str] | None:
    """(top-level field, path) of the first string (value or key) of a JSON body holding a lone surrogate."""
    try:
        document = json.loads(body)
    except ValueError:
        return None  # not JSON: the route's own parsing reports it

    def walk(value: Any, path: str) -> str | None:
        if isinstance(value, str):
            return path if _has_lone_surrogate(value) else None
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if _has_lone_surrogate(str(key)):
                    return child
                found = walk(item, child)
                if found is not None:
                    return found
        elif isinstance(value, list):
            for index, item in enumerate(value):
                found = walk(item, f"{path}[{index}]")
                if found is not None:
                    return found
        return None

    path = walk(document, "")
    if path is None:
        return None
    return re.split(r"[.\[]", path, maxsplit=1)[0] or "body", path or "body"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive() that first hands out the already-read body, then the connection's own events (disconnect)."""
    is_body_sent = False

    async def replayed() -> Message:
        nonlocal is_body_sent
        if not is_body_sent:
            is_body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def build_app(
    options: ServerOptions,
    specs: Sequence[ModelSpec] = (),
    *,
    loaded: Sequence[tuple[ModelSpec, Any]] = (),
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The inferd ASGI app serving a model table.

    `specs` (resolved: local path and kind) load one after another in the background once the app starts; /health
    is 503 until all are ready. `loaded` are (spec, engine) pairs already loaded (tests, benchmarks): started at
    once. `on_load_failure(name)` is called if a model of `specs` fails to load.
    """
    if not specs and not loaded:
        raise ValueError("build_app needs at least one model (specs or loaded)")
    state = ServerState(options)
    state.add_models(list(specs))
    state.on_load_failure = on_load_failure

    async def load_in_background() -> None:
        for spec in specs:
            await state.load_model(spec, is_startup=True)
        # Everything loaded at startup lives as long as the server: keep the collector from walking it again on
        # every full collection (long GC pauses showed in tail latency under load).
        gc.collect()
        gc.freeze()

    async def unload_idle_models() -> None:
        while True:  # a request's keep_alive may set one on any model at any time (state.apply_keep_alive)
            keep_alives = [m.keep_alive_s for m in state.models.values() if m.keep_alive_s is not None]
            await asyncio.sleep(min(1.0, max(0.05, min(keep_alives) / 4)) if keep_alives else 1.0)
            try:
                await state.unload_idle_models()
            except Exception:  # noqa: BLE001 - the reaper must outlive one failed unload
                logger.exception("keep-alive: unloading an idle model failed")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for spec, engine in loaded:
            state.add_loaded_engine(spec, engine)
        load_task = asyncio.create_task(load_in_background()) if specs else None
        reaper_task = asyncio.create_task(unload_idle_models())
        grpc_server = None
        if options.grpc_port is not None:
            from inferd.server.grpc_oip import start_grpc_server

            grpc_server = await start_grpc_server(state, options.grpc_host, options.grpc_port)
        try:
            yield
        finally:
            reaper_task.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace_s=1.0)
            if load_task is not None and not load_task.done():
                load_task.cancel()
            state.shutdown()

    app = FastAPI(
        title="inferd",
        version=importlib.metadata.version("inferd"),
        description="One server for LLMs (OpenAI-compatible chat and completions), embedding models "
                    "(OpenAI-compatible embeddings) and inferd's own routes. Every request names its model.",
        lifespan=lifespan,
        openapi_tags=[
            {"name": "OpenAI-compatible", "description": "OpenAI's API shape; the official openai client works."},
            {"name": "inferd", "description": "inferd's own routes (not part of OpenAI's API)."},
        ],
    )
    app.state.inferd = state
    install_error_handlers(app)
    app.include_router(oip_router)  # first: Starlette tries routes in order and OIP infer is the hot path
    app.include_router(openai_router)
    app.include_router(embeddings_router)
    app.include_router(ops_router)
    app.include_router(collections_router)
    app.include_router(dashboard_router)
    app.add_middleware(GuardMiddleware, state=state)
    return app


class HotPaths:
    """The outermost ASGI app of `inferd serve`: two hot paths go to bare ASGI handlers, each behind its own
    GuardMiddleware (the same key, drain, body and UTF-8 checks); everything else goes to FastAPI.
    - OIP infer (`POST /v2/models/{name}[/versions/{v}]/infer`, the tabular hot path, where one row costs less
      than the framework around it);
    - `POST /v1/embeddings` with a JSON body (routes/embeddings.py: a one-sentence request cost the event loop
      about as much in the framework as in everything else)."""

    def __init__(self, app: FastAPI, state: ServerState) -> None:
        self.app = app
        self._infer = GuardMiddleware(infer_asgi_app(state), state=state)
        self._embeddings = GuardMiddleware(embeddings_asgi_app(state), state=state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
        elif scope["path"] == EMBEDDINGS_PATH:
            content_type = next((value for name, value in scope["headers"] if name == b"content-type"), None)
            if is_json_content_type(content_type):
                await self._answer(self._embeddings, scope, receive, send, "embeddings")
            else:  # other types: FastAPI's own handling and errors
                await self.app(scope, receive, send)
        elif INFER_PATH_RE.fullmatch(scope["path"]) is not None:
            await self._answer(self._infer, scope, receive, send, "OIP infer")
        else:
            await self.app(scope, receive, send)

    @staticmethod
    async def _answer(handler: ASGIApp, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        is_started = False

        async def tracked_send(message: Message) -> None:
            nonlocal is_started
            is_started = True
            await send(message)

        try:
            await handler(scope, receive, tracked_send)
        except Exception as exc:
            logger.exception("%s failed", what)
            if is_started:
                raise  # uvicorn closes the connection: the answer is cut, never silently short
            # OIP's error shape there, OpenAI's (as errors.py's handler of the unexpected) here
            body = b'{"error":"internal server error"}' if what == "OIP infer" else json.dumps(
                error_body(500, f"internal server error: {type(exc).__name__}: {exc}")).encode()
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- running


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains (503 to new requests, in-flight ones finish) before stopping."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's default, the signal is not re-raised after shutdown, so a drained SIGTERM exits 0.
        if sig == signal.SIGTERM and self._loop is not None and self._drain_task is None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._begin_drain)
            return
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    def _begin_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        state = self.state
        state.is_draining = True
        timeout_s = state.options.drain_timeout_s
        logger.info("SIGTERM: draining %d request(s) in flight, for up to %.1f s", state.num_in_flight, timeout_s)
        deadline = time.monotonic() + timeout_s
        while state.num_in_flight > 0 and time.monotonic() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        if state.num_in_flight > 0:
            logger.warning("drain timeout: stopping with %d request(s) still in flight", state.num_in_flight)
            # Streams end with an error event and [DONE], other requests with an error body, before the sockets close.
            state.fail_in_flight(f"server is shutting down: the {timeout_s:g} s drain timeout ended this request")
            flush_deadline = time.monotonic() + 1.0
            while state.num_in_flight > 0 and time.monotonic() < flush_deadline and not self.should_exit:
                await asyncio.sleep(0.02)
        self.should_exit = True


def _configure_logging(level: str) -> None:
    numeric_level = getattr(logging, level.upper(), logging.INFO)
    package_logger = logging.getLogger("inferd")
    if not package_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(numeric_level)
    package_logger.propagate = False
    request_logger = logging.getLogger("inferd.requests")
    if not request_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))  # the message is one JSON object
        request_logger.addHandler(handler)
    request_logger.propagate = False


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to the CLI: the model table, the engine flags every LLM starts from, then the server's own.
    cli.py resolves the model table through the store and calls `serve_main(args, specs)`."""
    p = subparsers.add_parser("serve", help="HTTP server: OpenAI-compatible LLMs and embeddings, several models at once")
    t = p.add_argument_group("models")
    t.add_argument("--model", action="append", default=None, metavar="[NAME=]SOURCE",
                   help=f"a model to serve (repeatable): catalog name, Hugging Face folder, .gguf file; NAME= sets the "
                        f"name clients send (default: SOURCE). Default: {DEFAULT_MODEL}")
    t.add_argument("--models-file", default=None, help="YAML list of models with name, source, kind, options")
    t.add_argument("--model-repository", default=None, metavar="DIR",
                   help="a Triton-style repository: one tabular model per folder (<name>/<version>/model.onnx)")
    t.add_argument("--kind", default=None, choices=[k.value for k in ModelKind],
                   help="the kind of the single --model when it cannot be inferred")
    t.add_argument("--served-model-name", default=None, help="the name clients send for the single --model")
    t.add_argument("--keep-alive", default=None, metavar="DURATION",
                   help="unload a model idle this long (e.g. 30s, 5m; -1 = never, the default) and free its memory; "
                        "the next request for it loads it again and waits (Ollama's keep_alive)")
    EngineArgs.add_cli_args(p, include_model=False)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the Open Inference Protocol v2 over gRPC (tabular models) on this port")
    g.add_argument("--api-key", action="append", default=None,
                   help=f"require 'Authorization: Bearer KEY' (repeatable; also ${API_KEY_ENV}, comma-separated, "
                        f"and --api-key-file, which keep keys out of `ps`)")
    g.add_argument("--api-key-file", default=None, help="a file with one accepted API key per line")
    g.add_argument("--metrics-require-key", action="store_true", help="/metrics needs an API key too")
    g.add_argument("--body-read-timeout", type=float, default=DEFAULT_BODY_READ_TIMEOUT_S,
                   help="seconds a request body may take to arrive (408 after)")
    g.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="answer 429 when more than this many requests wait to be scheduled")
    g.add_argument("--max-body-bytes", default=str(DEFAULT_MAX_BODY_BYTES), help="largest request body, e.g. 4MiB")
    g.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="seconds in-flight requests may run after SIGTERM")
    g.add_argument("--response-cache-bytes", default=str(DEFAULT_RESPONSE_CACHE_BYTES), metavar="SIZE",
                   help="bound of the exact response cache (deterministic chat/completions answers, embedding "
                        "vectors), e.g. 64MiB (the default); 0 turns it off")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def server_options_from_args(args: argparse.Namespace) -> ServerOptions:
    """The ServerOptions of `inferd serve`'s flags (also what every Ray Serve replica of `--ray` runs with)."""
    engine_args = EngineArgs.from_cli(args)
    engine_args.validate_static()
    if args.max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {args.max_queue}")
    if args.drain_timeout < 0:
        raise ValueError(f"drain_timeout must be >= 0 seconds, got {args.drain_timeout}")
    llm_defaults = {k: v for k, v in vars(engine_args).items() if k not in ("model", "served_model_name")}
    if args.body_read_timeout <= 0:
        raise ValueError(f"body_read_timeout must be > 0 seconds, got {args.body_read_timeout}")
    return ServerOptions(
        api_keys=read_api_keys(args.api_key, args.api_key_file, os.environ),
        metrics_require_key=args.metrics_require_key,
        body_read_timeout_s=args.body_read_timeout,
        max_queue=args.max_queue,
        max_body_bytes=parse_size_bytes(args.max_body_bytes, "max_body_bytes"),
        drain_timeout_s=args.drain_timeout,
        llm_defaults=llm_defaults,
        keep_alive_s=None if args.keep_alive is None else parse_duration_s(args.keep_alive, "keep_alive"),
        model_repository=args.model_repository,
        grpc_port=args.grpc_port,
        grpc_host=args.host,
        response_cache_bytes=0 if str(args.response_cache_bytes).strip() == "0"
        else parse_size_bytes(args.response_cache_bytes, "response_cache_bytes"),
    )


def serve_main(args: argparse.Namespace, specs: Sequence[ModelSpec]) -> int:
    """Serve until stopped; 0 after a clean stop (SIGTERM drain included), 1 if a model failed to load."""
    _configure_logging(args.log_level)
    options = server_options_from_args(args)
    exit_status = 0
    server: Any = None

    def on_load_failure(_name: str) -> None:
        nonlocal exit_status
        exit_status = 1
        if server is not None:
            server.should_exit = True

    app = build_app(options, specs, on_load_failure=on_load_failure)
    state = app.state.inferd
    # OIP infer answered inside the HTTP protocol where uvicorn runs httptools (server/fast_http.py); HotPaths
    # answers the same requests as bare ASGI otherwise.
    # $INFERD_HOT_ROUTES=0 turns it off (benchmarks/tabular.py's inferd-asgi system measures the difference).
    http_protocol = (hot_protocol_class([infer_hot_route(state)], GuardMiddleware(app, state=state))
                     if os.environ.get("INFERD_HOT_ROUTES", "1") != "0" else None)
    if http_protocol is not None:
        logger.info("OIP infer is answered inside the HTTP protocol (server/fast_http.py)")
    config = uvicorn.Config(
        HotPaths(app, state),
        http=http_protocol if http_protocol is not None else "auto",
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # one JSON line per request comes from inferd.requests instead
        timeout_graceful_shutdown=1,  # after the drain; only a timed-out drain leaves streams to cut
        lifespan="on",
    )
    server = DrainingServer(config, state)
    server.run()
    if not server.started:
        return 1
    return exit_status
