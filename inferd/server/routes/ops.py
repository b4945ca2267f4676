"""Layer 5: operations routes: health, Prometheus metrics, the model list, and inferd's own tokenize/detokenize."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inferd.server.errors import bad_request
from inferd.server.metrics import CONTENT_TYPE
from inferd.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from inferd.server.state import ServerState

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}
_STARTED_AT = int(time.time())


def _state(request: Request) -> ServerState:
    return request.app.state.inferd


@router.get("/health", tags=["inferd"], summary="200 when the model is loaded and the server accepts requests, else 503")
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    if state.is_draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    if state.engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if not state.engine.is_running:
        return JSONResponse({"status": "stopped"}, status_code=503)
    return JSONResponse({"status": "ok", "model": state.served_model_name})


@router.get("/metrics", tags=["inferd"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = _state(request)
    if state.engine is not None:
        stats = state.engine.latest_stats()
        if stats is not None:
            state.metrics.set_engine_stats(stats)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", tags=["OpenAI-compatible"], response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    root = max_model_len = None
    if state.engine is not None:
        root = state.engine.config.model
        max_model_len = state.engine.config.max_model_len
    card = ModelCard(id=state.served_model_name, created=_STARTED_AT, root=root, max_model_len=max_model_len)
    return ModelList(data=[card])


@router.post(
    "/tokenize",
    tags=["inferd"],
    response_model=TokenizeResponse,
    responses=_ERRORS,
    summary="Token ids of a prompt, or of chat messages after the chat template (inferd's own, not OpenAI)",
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    engine = state.require_engine()
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            token_ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:
            raise bad_request(f"messages: the chat template failed: {exc}", "messages") from None
    else:
        assert body.prompt is not None
        token_ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=token_ids, count=len(token_ids), max_model_len=engine.config.max_model_len)


@router.post(
    "/detokenize",
    tags=["inferd"],
    response_model=DetokenizeResponse,
    responses=_ERRORS,
    summary="Text of token ids, special tokens included (inferd's own, not OpenAI)",
)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _state(request)
    engine = state.require_engine()
    state.check_model(body.model)
    vocab_size = engine.tokenizer.vocab_size
    for token_id in body.tokens:
        if token_id >= vocab_size:
            raise bad_request(f"tokens: id {token_id} is outside the vocabulary [0, {vocab_size})", "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens, skip_special_tokens=False))
