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
import importlib.metadata
import hmac
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.config import DEFAULT_MODEL, EngineArgs, parse_size_bytes
from inferd.server.errors import error_response, install_error_handlers
from inferd.server.routes.collections import router as collections_router
from inferd.server.routes.openai import router as openai_router
from inferd.server.routes.ops import router as ops_router
from inferd.serving import ModelKind, ModelSpec
from inferd.server.state import (
    ARRIVAL_TIME_SCOPE_KEY,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    ServerOptions,
    ServerState,
)

logger = logging.getLogger("inferd.server")

API_KEY_ENV = "INFERD_API_KEY"
# Paths served without an API key and while draining (probes, scrapers, docs).
_OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.options.api_key
        self._expected_authorization = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL_TIME_SCOPE_KEY] = time.monotonic()
        state = self.state
        if scope["path"] not in _OPEN_PATHS:
            if self._expected_authorization is not None and not self._is_authorized(scope):
                response = error_response(
                    401, "missing or incorrect API key (send Authorization: Bearer <key>)", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
            if state.is_draining:
                await error_response(503, "server is shutting down", code="shutting_down")(scope, receive, send)
                return
        if scope["method"] in _BODY_METHODS:
            body_or_response = await self._read_body(scope, receive)
            if body_or_response is None:  # the client left while sending
                return
            if not isinstance(body_or_response, bytes):
                await body_or_response(scope, receive, send)
                return
            receive = _replay_body(body_or_response, receive)
        state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.num_in_flight -= 1

    def _is_authorized(self, scope: Scope) -> bool:
        assert self._expected_authorization is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected_authorization)
        return False

    async def _read_body(self, scope: Scope, receive: Receive) -> Any:
        """The whole body (bytes), an error response, or None if the client disconnected."""
        max_body_bytes = self.state.options.max_body_bytes
        too_large = error_response(
            413, f"request body is larger than the limit of {max_body_bytes} bytes", code="request_too_large"
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared_bytes = int(value)
                except ValueError:
                    return error_response(400, "Content-Length is not an integer")
                if declared_bytes > max_body_bytes:
                    return too_large
                break
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            num_bytes += len(chunk)
            if num_bytes > max_body_bytes:  # chunked transfer, or a Content-Length that lied
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return error_response(400, f"request body is not valid UTF-8 (invalid byte at offset {exc.start})")
        return body


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
            await state.load_model(spec)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for spec, engine in loaded:
            state.add_loaded_engine(spec, engine)
        load_task = asyncio.create_task(load_in_background()) if specs else None
        try:
            yield
        finally:
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
    app.include_router(openai_router)
    app.include_router(ops_router)
    app.include_router(collections_router)
    app.add_middleware(GuardMiddleware, state=state)
    return app


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
    EngineArgs.add_cli_args(p, include_model=False)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    g.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="answer 429 when more than this many requests wait to be scheduled")
    g.add_argument("--max-body-bytes", default=str(DEFAULT_MAX_BODY_BYTES), help="largest request body, e.g. 4MiB")
    g.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="seconds in-flight requests may run after SIGTERM")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def serve_main(args: argparse.Namespace, specs: Sequence[ModelSpec]) -> int:
    """Serve until stopped; 0 after a clean stop (SIGTERM drain included), 1 if a model failed to load."""
    _configure_logging(args.log_level)
    engine_args = EngineArgs.from_cli(args)
    engine_args.validate_static()
    if args.max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {args.max_queue}")
    if args.drain_timeout < 0:
        raise ValueError(f"drain_timeout must be >= 0 seconds, got {args.drain_timeout}")
    llm_defaults = {k: v for k, v in vars(engine_args).items() if k not in ("model", "served_model_name")}
    options = ServerOptions(
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_queue=args.max_queue,
        max_body_bytes=parse_size_bytes(args.max_body_bytes, "max_body_bytes"),
        drain_timeout_s=args.drain_timeout,
        llm_defaults=llm_defaults,
    )
    exit_status = 0
    server: Any = None

    def on_load_failure(_name: str) -> None:
        nonlocal exit_status
        exit_status = 1
        if server is not None:
            server.should_exit = True

    app = build_app(options, specs, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # one JSON line per request comes from inferd.requests instead
        timeout_graceful_shutdown=1,  # after the drain; only a timed-out drain leaves streams to cut
        lifespan="on",
    )
    server = DrainingServer(config, app.state.inferd)
    server.run()
    if not server.started:
        return 1
    return exit_status
