"""Layer 5: large JSON bodies are parsed and validated off the event loop.

FastAPI parses a body with json.loads and validates the Python objects on the event loop: for a 4 MB body (a
million token ids, tens of thousands of messages) that is hundreds of milliseconds in which no other request,
not even /health, is served. Routes of routers built with `route_class=OffLoopBodyRoute` get bodies of
`OFF_LOOP_MIN_BYTES` or more validated by pydantic's own JSON parser (`model_validate_json`, no Python objects in
between) on a worker thread; FastAPI then receives the validated model, which it does not validate again.
Smaller bodies take FastAPI's usual path, as a thread hop would cost more than it saves. Errors are the same
`RequestValidationError`s either way, so clients see the same 400s.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

# $INFERD_OFF_LOOP_MIN_BYTES moves the threshold (benchmarks/http_stall.py sets it very high to measure FastAPI's
# own path side by side).
OFF_LOOP_MIN_BYTES = int(os.environ.get("INFERD_OFF_LOOP_MIN_BYTES", 64 << 10))


class _ParsedRequest(Request):
    """A request whose body was read and validated already: FastAPI's json() gets the model instance."""

    def __init__(self, request: Request, raw: bytes, validated: BaseModel) -> None:
        super().__init__(request.scope, request.receive)
        self._body = raw
        self._validated = validated

    async def json(self) -> Any:
        return self._validated


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    field = route.body_field
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_large_json(request: Request) -> bool:
    """A declared body of OFF_LOOP_MIN_BYTES or more that FastAPI would parse as JSON (no type, or a JSON type)."""
    try:
        num_bytes = int(request.headers.get("content-length", "0"))
    except ValueError:
        return False
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = not content_type or content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json"))
    return num_bytes >= OFF_LOOP_MIN_BYTES and is_json


class OffLoopBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        model = _body_model(self)
        if model is None:
            return handler

        async def route_handler(request: Request) -> Response:
            if _is_large_json(request):
                raw = await request.body()
                try:
                    validated = await asyncio.to_thread(model.model_validate_json, raw)
                except ValidationError as exc:
                    errors = [{**error, "loc": ("body", *error.get("loc", ()))} for error in exc.errors()]
                    raise RequestValidationError(errors, body=None) from None
                request = _ParsedRequest(request, raw, validated)
            return await handler(request)

        return route_handler


async def read_asgi_body(receive: Callable[[], Awaitable[dict]]) -> bytes | None:
    """The whole request body from a bare ASGI app's `receive` (the hot paths of server/app.py); None when the
    client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
