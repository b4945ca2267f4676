"""Layer 5: POST /v1/embeddings, OpenAI's wire format, for models of kind embed.

A request's path: parse the body (protocol_embeddings.py: every bad input is a 400 naming its element) -> the
model by name from the server's table (404 unknown, 400 another kind) -> tokenize strings (token-id inputs are
used as given) -> too long: 400 naming the input's index, or cut to the model's limit with `truncate: true` ->
`AsyncEmbedEngine.embed` (micro-batched with other requests' inputs; 429 + Retry-After when its queue is full)
-> `dimensions` (truncate and renormalise) -> float lists or base64.

`embeddings_answer` is that work after the body is validated; two front doors share it. `inferd serve` answers
JSON bodies through `embeddings_asgi_app`, a bare ASGI handler that `HotPaths` (server/app.py) calls before
FastAPI, behind its own `GuardMiddleware`: a one-sentence request spent about as much of the event loop's CPU in
Starlette's and FastAPI's middleware, routing, dependency solving and Response objects as in everything else
(benchmarks/RESULTS.md). It validates the body as FastAPI's route does (json.loads, then the model's validator
with FastAPI's options; bodies of OFF_LOOP_MIN_BYTES or more on a worker thread, as OffLoopBodyRoute does) and
turns failures into the same errors. The FastAPI route below serves everything else (other content types, and
the app without `HotPaths`: TestClient, Ray Serve) and is the schema /docs shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from inferd.batching import BatchAbortedError, BatcherStoppedError, QueueFullError
from inferd.server.bodies import OFF_LOOP_MIN_BYTES, OffLoopBodyRoute, read_asgi_body
from inferd.server.errors import APIError, bad_request, error_body, validation_error_to_api_error
from inferd.server.response_cache import CACHE_HEADER
from inferd.server.protocol_embeddings import (
    EmbeddingInputError,
    EmbeddingRequest,
    check_lengths,
    embeddings_response_json,
    parse_embedding_input,
    shorten,
)
from inferd.serving import ModelKind

logger = logging.getLogger("inferd.server")

router = APIRouter(tags=["OpenAI-compatible"], route_class=OffLoopBodyRoute)

EMBEDDINGS_PATH = "/v1/embeddings"
# Inputs with more characters than this in all are tokenized off the event loop.
_TOKENIZE_IN_THREAD_MIN_CHARS = 32 * 1024
_RETRY_AFTER_S = "1"


def _tokenize(engine: Any, texts: list[str], truncate: bool) -> list[list[int]]:
    token_id_lists = engine.tokenizer.encode_batch(texts, truncate=False)
    if not truncate:
        check_lengths(token_id_lists, engine.max_seq_length)
        return token_id_lists
    too_long = [i for i, ids in enumerate(token_id_lists) if len(ids) > engine.max_seq_length]
    if too_long:
        cut = engine.tokenizer.encode_batch([texts[i] for i in too_long], truncate=True)
        for i, ids in zip(too_long, cut):
            token_id_lists[i] = ids
    return token_id_lists


async def _token_id_lists(engine: Any, body: EmbeddingRequest) -> list[list[int]]:
    try:
        parsed = parse_embedding_input(body.input, engine.tokenizer.vocab_size)
        if parsed.texts is not None:
            if sum(len(t) for t in parsed.texts) >= _TOKENIZE_IN_THREAD_MIN_CHARS:
                return await asyncio.to_thread(_tokenize, engine, parsed.texts, body.truncate)
            return _tokenize(engine, parsed.texts, body.truncate)
        assert parsed.token_id_lists is not None
        if body.truncate:  # token ids are used as given, so cutting keeps their first max_seq_length
            return [ids[: engine.max_seq_length] for ids in parsed.token_id_lists]
        check_lengths(parsed.token_id_lists, engine.max_seq_length)
        return parsed.token_id_lists
    except EmbeddingInputError as exc:
        raise bad_request(str(exc), exc.param) from None


async def embeddings_answer(state: Any, body: EmbeddingRequest, request: Request) -> tuple[bytes, dict[str, str] | None]:
    """(JSON body, extra headers) of a 200 answer to a validated body, or the APIError to answer instead.
    `request` gives the response cache the caller's bearer token."""
    started = time.monotonic()
    served = await state.use_model(body.model, ModelKind.EMBED)
    engine = served.engine
    status = "error"  # inferd:requests statuses: ok, error, aborted
    num_items = num_tokens = 0
    try:
        if body.dimensions is not None and body.dimensions > engine.dimension:
            raise bad_request(
                f"dimensions must be <= {engine.dimension} (the model's dimension), got {body.dimensions}", "dimensions"
            )
        token_id_lists = await _token_id_lists(engine, body)
        num_items = len(token_id_lists)
        num_tokens = sum(len(ids) for ids in token_id_lists)
        try:
            vectors, cache_status = await state.response_cache.embed(request, served, body, token_id_lists, engine.embed)
        except QueueFullError as exc:
            raise APIError(429, f"server is busy: {exc}", code="rate_limit_exceeded", headers={"Retry-After": _RETRY_AFTER_S}) from None
        except BatcherStoppedError as exc:
            raise APIError(503, f"model {served.name!r} is not running: {exc}", code="engine_stopped") from None
        except BatchAbortedError as exc:  # e.g. its worker process died: the next request is served by a new one
            raise APIError(503, f"model {served.name!r} could not compute this request: {exc}", code="worker_died",
                           headers={"Retry-After": _RETRY_AFTER_S}) from None
        except ValueError as exc:
            raise bad_request(str(exc), "input") from None
        vectors = shorten(vectors, body.dimensions, engine.dimension)
        content = embeddings_response_json(vectors, body.encoding_format, served.name, num_tokens)
        status = "ok"
        return content, ({CACHE_HEADER: cache_status} if cache_status is not None else None)
    except asyncio.CancelledError:
        status = "aborted"  # the client went away; its queued inputs were dropped
        raise
    finally:
        state.metrics.observe_request(served.name, ModelKind.EMBED, status, time.monotonic() - started, num_items, num_tokens)


@router.post(EMBEDDINGS_PATH)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    content, headers = await embeddings_answer(request.app.state.inferd, body, request)
    return Response(content=content, media_type="application/json", headers=headers)


# ---------------------------------------------------------------------------------------------- the hot path


def is_json_content_type(value: bytes | None) -> bool:
    """Content-Type application/json (parameters such as charset allowed): the bodies the hot path takes."""
    return value is not None and value.split(b";", 1)[0].strip().lower() == b"application/json"


def _body_error(errors: list[Any]) -> APIError:
    return validation_error_to_api_error(RequestValidationError(errors, body=None))


def _validated_body(raw: bytes) -> EmbeddingRequest:
    """The body as FastAPI's route validates an application/json one (fastapi/routing.py and
    ModelField.validate: json.loads (an empty body is missing), then the model with from_attributes=True, errors'
    loc under "body"), or the APIError its exception handlers would answer."""
    if not raw:
        raise _body_error([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _body_error([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {},
                            "ctx": {"error": exc.msg}}]) from None
    try:
        return EmbeddingRequest.model_validate(value, from_attributes=True)
    except ValidationError as exc:
        raise _body_error(_under_body(exc)) from None


def _validated_large_body(raw: bytes) -> EmbeddingRequest:
    """As OffLoopBodyRoute validates a large body (on a worker thread: pydantic's own JSON parser)."""
    try:
        return EmbeddingRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _body_error(_under_body(exc)) from None


def _under_body(exc: ValidationError) -> list[dict[str, Any]]:
    return [{**error, "loc": ("body", *error.get("loc", ()))} for error in exc.errors(include_url=False)]


def _declared_bytes(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _json_bytes(value: Any) -> bytes:
    """As Starlette's JSONResponse renders a body."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def embeddings_asgi_app(state: Any) -> ASGIApp:
    """POST /v1/embeddings with a JSON body as a bare ASGI app over `state`, for `HotPaths` (server/app.py). The
    guard in front of it has read and checked the body; answers are the FastAPI route's, byte for byte."""

    async def embeddings_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_asgi_body(receive)
        if raw is None:
            return
        headers: dict[str, str] | None
        try:
            if _declared_bytes(scope) >= OFF_LOOP_MIN_BYTES:  # as OffLoopBodyRoute chooses
                body = await asyncio.to_thread(_validated_large_body, raw)
            else:
                body = _validated_body(raw)
            payload, headers = await embeddings_answer(state, body, Request(scope))
            status = 200
        except APIError as exc:
            status, headers = exc.status_code, exc.headers
            payload = _json_bytes(error_body(exc.status_code, exc.message, exc.param, exc.code))
        raw_headers = [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in (headers or {}).items()]
        raw_headers.append((b"content-length", str(len(payload)).encode()))
        raw_headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})

    return embeddings_asgi
