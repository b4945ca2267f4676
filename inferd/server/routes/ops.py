"""Layer 5: operations routes: health (per model), Prometheus metrics, the model list (every kind), and inferd's own
tokenize/detokenize (generate models)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inferd.server.bodies import OffLoopBodyRoute
from inferd.server.errors import APIError, bad_request
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
from inferd.server.state import ServedModel, ServerState
from inferd.serving import ModelKind

router = APIRouter(route_class=OffLoopBodyRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}
_STARTED_AT = int(time.time())


def _state(request: Request) -> ServerState:
    return request.app.state.inferd


@router.get(
    "/health",
    tags=["inferd"],
    summary="200 when every model is loaded and the server accepts requests, else 503; per-model status in the body",
)
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    models = {name: served.describe() for name, served in state.models.items()}
    if state.is_draining:
        status = "draining"
    elif state.is_ready:
        status = "ok"
    elif any(m["status"] == "failed" for m in models.values()):
        status = "failed"
    elif any(m["status"] == "loading" for m in models.values()):
        status = "loading"
    else:
        status = "degraded"
    return JSONResponse({"status": status, "models": models}, status_code=200 if status == "ok" else 503)


@router.get("/metrics", tags=["inferd"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = _state(request)
    state.refresh_engine_metrics()
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _model_card(served: ServedModel) -> ModelCard:
    card = ModelCard(id=served.name, created=_STARTED_AT, root=served.spec.source, kind=served.kind.value,
                     status=served.describe()["status"])
    engine = served.engine
    if served.kind is ModelKind.GENERATE and engine is not None:
        card.max_model_len = engine.config.max_model_len
    elif served.kind is ModelKind.EMBED and engine is not None:
        card.max_model_len = getattr(engine, "max_seq_length", None)
        card.dimensions = getattr(engine, "dimension", None)
    return card


@router.get("/v1/models", tags=["OpenAI-compatible"], response_model=ModelList, responses=_ERRORS,
            summary="Every served model with its kind (generate, embed, tabular) and status")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(served) for served in _state(request).models.values()])


@router.get("/v1/models/{model_id:path}", tags=["OpenAI-compatible"], response_model=ModelCard, responses=_ERRORS,
            summary="One served model")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    state = _state(request)
    served = state.models.get(model_id)
    if served is None:
        raise APIError(404, f"model {model_id!r} does not exist; served models: {list(state.models)}",
                       param="model", code="model_not_found")
    return _model_card(served)


@router.post(
    "/tokenize",
    tags=["inferd"],
    response_model=TokenizeResponse,
    responses=_ERRORS,
    summary="Token ids of a prompt, or of chat messages after the chat template (inferd's own, not OpenAI)",
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    engine = (await state.use_model(body.model, ModelKind.GENERATE)).engine
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
    engine = (await state.use_model(body.model, ModelKind.GENERATE)).engine
    vocab_size = engine.tokenizer.vocab_size
    for token_id in body.tokens:
        if token_id >= vocab_size:
            raise bad_request(f"tokens: id {token_id} is outside the vocabulary [0, {vocab_size})", "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens, skip_special_tokens=False))
