"""Layer 5: POST /v1/embeddings, OpenAI's wire format, for models of kind embed.

A request's path: parse the body (protocol_embeddings.py: every bad input is a 400 naming its element) -> the
model by name from the server's table (404 unknown, 400 another kind) -> tokenize strings (token-id inputs are
used as given) -> too long: 400 naming the input's index, or cut to the model's limit with `truncate: true` ->
`AsyncEmbedEngine.embed` (micro-batched with other requests' inputs; 429 + Retry-After when its queue is full)
-> `dimensions` (truncate and renormalise) -> float lists or base64.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from inferd.batching import BatcherStoppedError, QueueFullError
from inferd.server.bodies import OffLoopBodyRoute
from inferd.server.errors import APIError, bad_request
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

router = APIRouter(tags=["OpenAI-compatible"], route_class=OffLoopBodyRoute)

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


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    started = time.monotonic()
    state = request.app.state.inferd
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
        except ValueError as exc:
            raise bad_request(str(exc), "input") from None
        vectors = shorten(vectors, body.dimensions, engine.dimension)
        content = embeddings_response_json(vectors, body.encoding_format, served.name, num_tokens)
        status = "ok"
        headers = {CACHE_HEADER: cache_status} if cache_status is not None else None
        return Response(content=content, media_type="application/json", headers=headers)
    except asyncio.CancelledError:
        status = "aborted"  # the client went away; its queued inputs were dropped
        raise
    finally:
        state.metrics.observe_request(served.name, ModelKind.EMBED, status, time.monotonic() - started, num_items, num_tokens)
