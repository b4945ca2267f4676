"""Layer 5: the collections API (similarity search over persistent vector collections).

    POST   /v1/collections                      {"name", "model" | "dimension", "metric"}     -> collection
    GET    /v1/collections                      -> {"object": "list", "data": [collection, ...]}
    GET    /v1/collections/{name}               -> collection (count, dimension, index kind, bytes)
    DELETE /v1/collections/{name}               -> {"name", "deleted": true}
    POST   /v1/collections/{name}/items         {"items": [{"id", "text" | "vector", "metadata"}]}
                                                -> {"upserted", "count"}
    GET    /v1/collections/{name}/items/{id}    -> {"id", "metadata", "text"?, "vector"}
    DELETE /v1/collections/{name}/items/{id}    -> {"id", "deleted": true}
    POST   /v1/collections/{name}/query         {"text" | "vector" | "id", "k", "filter", "exclude"}
                                                -> {"results": [{"id", "score", "metadata"}]} best first

A "vector" is a JSON list of numbers or, for speed, a base64 string of little-endian float32 (like OpenAI's
`encoding_format: "base64"` embeddings): parsing 500 x 384 numbers from JSON costs more than storing them.

The store (every collection under $INFERD_HOME/collections) opens in this router's lifespan, so a restarted
server answers with every collection it acknowledged writes to. Text is embedded by the collection's model,
served by this same server (`state.use_model(model, ModelKind.EMBED)`, which wakes a model asleep after its
keep-alive). Collection work runs on worker threads (an upsert returns after its log record is fsync'd), except
a quick query whose locks are free, answered on the event loop (`Collection.query(wait=False)`): the hop to a
thread and back cost more than the ~1 ms graph search (benchmarks/RESULTS.md, "Collections over HTTP").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferd.batching import BatchAbortedError, BatcherStoppedError, QueueFullError
from inferd.collections import Collection, CollectionError, CollectionStore, Item
from inferd.collections.collection import MAX_K
from inferd.serving import ModelKind
from inferd.server.errors import APIError, bad_request

logger = logging.getLogger("inferd.server")

MAX_ITEMS_PER_REQUEST = 10_000
MAX_TEXT_CHARS = 100_000


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if getattr(app.state, "collections", None) is None:
        app.state.collections = await asyncio.to_thread(CollectionStore)
        logger.info("collections: %d loaded from %s", len(app.state.collections.list()), app.state.collections.root)
    try:
        yield
    finally:
        app.state.collections.close()


router = APIRouter(lifespan=lifespan)


# ---------------------------------------------------------------------------------------------------- bodies
class CreateCollectionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str | None = None
    dimension: int | None = None
    metric: str = "cosine"


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    text: str | None = None
    vector: list[float] | str | None = None  # numbers, or base64 of little-endian float32
    metadata: dict[str, Any] | None = None


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn] = Field(max_length=MAX_ITEMS_PER_REQUEST)


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    vector: list[float] | str | None = None
    id: str | None = None
    k: int = 10
    filter: dict[str, Any] | None = None
    exclude: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- helpers
async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body through pydantic's own JSON parser (faster than json.loads + validation for long number lists)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _decode_vector(vector: list[float] | str | None, dimension: int, param: str) -> Any:
    if not isinstance(vector, str):
        return vector
    try:
        raw = base64.b64decode(vector, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: a string vector must be base64 (of little-endian float32)", param) from None
    if len(raw) != 4 * dimension:
        raise bad_request(f"{param}: base64 vector decodes to {len(raw)} bytes; expected {4 * dimension} "
                          f"({dimension} float32)", param)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _store(request: Request) -> CollectionStore:
    return request.app.state.collections


def _api_error(exc: CollectionError) -> APIError:
    code = {404: "not_found", 409: "already_exists", 500: None}.get(exc.status_code, "invalid_value")
    return APIError(exc.status_code, exc.message, param=exc.param, code=code)


async def _call(fn, *args, **kwargs):
    """Run collection work on a worker thread; its errors become OpenAI-shaped API errors."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except CollectionError as exc:
        raise _api_error(exc) from None


def _collection(request: Request, name: str) -> Collection:
    try:
        return _store(request).get(name)
    except CollectionError as exc:
        raise _api_error(exc) from None


async def _embed_engine(request: Request, collection: Collection, param: str):
    if collection.config.model is None:
        raise bad_request(f"{param}: collection {collection.name!r} has no embedding model (it was created with a "
                          "dimension): send vectors", param)
    state = request.app.state.inferd
    return (await state.use_model(collection.config.model, ModelKind.EMBED)).engine


def _tokenize(engine: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, cut to the model's max_seq_length keeping the special tokens (as
    sentence-transformers does: a long document is embedded by its beginning)."""
    tokenizer = engine.tokenizer
    if hasattr(tokenizer, "encode_batch"):
        return [list(ids) for ids in tokenizer.encode_batch(list(texts), truncate=True)]
    return [list(tokenizer.encode(text))[: engine.max_seq_length] for text in texts]


async def embed_texts(engine: Any, texts: Sequence[str], model_name: str) -> np.ndarray:
    """[n, dim] float32 through an embedding engine (AsyncEmbedEngine): tokenize, truncate, embed."""
    if sum(len(t) for t in texts) >= 2_000:  # keep long tokenizations off the event loop
        token_id_lists = await asyncio.to_thread(_tokenize, engine, texts)
    else:
        token_id_lists = _tokenize(engine, texts)
    try:
        return np.asarray(await engine.embed(token_id_lists), dtype=np.float32)
    except QueueFullError as exc:
        raise APIError(429, f"server is busy: {exc}", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from None
    except BatcherStoppedError as exc:
        raise APIError(503, f"model {model_name!r} is not running: {exc}", code="engine_stopped") from None
    except BatchAbortedError as exc:  # e.g. its worker process died: the next request is served by a new one
        raise APIError(503, f"model {model_name!r} could not compute this request: {exc}", code="worker_died",
                       headers={"Retry-After": "1"}) from None


def _describe(collection: Collection) -> dict[str, Any]:
    return {"object": "collection", **collection.describe()}


# ---------------------------------------------------------------------------------------------------- routes
@router.post("/v1/collections")
async def create_collection(request: Request, body: CreateCollectionRequest) -> dict[str, Any]:
    dimension = body.dimension
    if body.model is None and dimension is None:
        raise bad_request("give a model (embedding model served here, for text) or a dimension (raw vectors)",
                          "model")
    if body.model is not None:
        engine = (await request.app.state.inferd.use_model(body.model, ModelKind.EMBED)).engine
        model_dimension = int(engine.dimension)
        if dimension is not None and dimension != model_dimension:
            raise bad_request(f"dimension: {dimension} differs from model {body.model!r}'s {model_dimension}; "
                              "leave it out", "dimension")
        dimension = model_dimension
    collection = await _call(_store(request).create, body.name, dimension=dimension, metric=body.metric,
                             model=body.model)
    return _describe(collection)


@router.get("/v1/collections")
async def list_collections(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_describe(c) for c in _store(request).list()]}


@router.get("/v1/collections/{name}")
async def describe_collection(request: Request, name: str) -> dict[str, Any]:
    return _describe(_collection(request, name))


@router.delete("/v1/collections/{name}")
async def delete_collection(request: Request, name: str) -> dict[str, Any]:
    await _call(_store(request).delete, name)
    return {"object": "collection.deleted", "name": name, "deleted": True}


@router.post("/v1/collections/{name}/items", openapi_extra={"requestBody": {"content": {"application/json": {
    "schema": UpsertRequest.model_json_schema()}}, "required": True}})
async def upsert_items(request: Request, name: str) -> dict[str, Any]:
    collection = _collection(request, name)
    body: UpsertRequest = await _parse(request, UpsertRequest)
    if not body.items:
        raise bad_request("items must hold at least one item", "items")
    text_positions = []
    for i, item in enumerate(body.items):
        if item.vector is None and item.text is None:
            raise bad_request(f"items[{i}]: give a text or a vector", f"items[{i}]")
        if item.text is not None and len(item.text) > MAX_TEXT_CHARS:
            raise bad_request(f"items[{i}].text: longer than {MAX_TEXT_CHARS} characters", f"items[{i}].text")
        if item.vector is None:
            text_positions.append(i)
    dimension = collection.config.dimension
    vectors: list[Any] = [_decode_vector(item.vector, dimension, f"items[{i}].vector")
                          for i, item in enumerate(body.items)]
    if text_positions:
        engine = await _embed_engine(request, collection, f"items[{text_positions[0]}].text")
        embedded = await embed_texts(engine, [body.items[i].text for i in text_positions], collection.config.model)
        for i, row in zip(text_positions, embedded):
            vectors[i] = row
    items = [Item(id=it.id, vector=v, metadata=it.metadata, text=it.text) for it, v in zip(body.items, vectors)]
    num_upserted = await _call(collection.upsert, items)
    return {"object": "collection.upsert", "upserted": num_upserted, "count": len(collection)}


@router.get("/v1/collections/{name}/items/{item_id}")
async def get_item(request: Request, name: str, item_id: str) -> dict[str, Any]:
    collection = _collection(request, name)
    return {"object": "collection.item", **await _call(collection.get, item_id)}


@router.delete("/v1/collections/{name}/items/{item_id}")
async def delete_item(request: Request, name: str, item_id: str) -> dict[str, Any]:
    collection = _collection(request, name)
    if await _call(collection.delete, [item_id]) == 0:
        raise APIError(404, f"no item {item_id!r} in collection {name!r}", param="id", code="not_found")
    return {"object": "collection.item.deleted", "id": item_id, "deleted": True}


@router.post("/v1/collections/{name}/query", openapi_extra={"requestBody": {"content": {"application/json": {
    "schema": QueryRequest.model_json_schema()}}, "required": True}})
async def query(request: Request, name: str) -> Response:
    collection = _collection(request, name)
    body: QueryRequest = await _parse(request, QueryRequest)
    given = [f for f in ("text", "vector", "id") if getattr(body, f) is not None]
    if len(given) != 1:
        raise bad_request(f"give exactly one of text, vector and id (got {given or 'none'})", "text")
    if not 1 <= body.k <= MAX_K:
        raise bad_request(f"k must be from 1 to {MAX_K}, got {body.k}", "k")
    vector = _decode_vector(body.vector, collection.config.dimension, "vector")
    if body.text is not None:
        if len(body.text) > MAX_TEXT_CHARS:
            raise bad_request(f"text: longer than {MAX_TEXT_CHARS} characters", "text")
        engine = await _embed_engine(request, collection, "text")
        vector = (await embed_texts(engine, [body.text], collection.config.model))[0]
    query_args = {"id": body.id, "k": body.k, "filter": body.filter, "exclude": body.exclude}
    try:  # a quick query with free locks is answered here: ~1 ms, less than the hop to a worker thread and back
        results = collection.query(vector, **query_args, wait=False)
    except CollectionError as exc:
        raise _api_error(exc) from None
    if results is None:
        results = await _call(collection.query, vector, **query_args)
    payload = {"object": "list", "results": [{"id": r.id, "score": r.score, "metadata": r.metadata} for r in results]}
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")
