"""Layer 5: every HTTP error leaves the server in OpenAI's shape.

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Routes raise `APIError` (or its helpers); FastAPI's own failures (body validation, unknown path, wrong method)
and unexpected exceptions are converted here too, so a client never sees FastAPI's 422 or a bare 500 page.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("inferd.server")

# OpenAI's error "type" per status; the openai client picks its exception class from the status alone.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error a route reports to the client; `param` names the request field at fault."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class InvalidParameter(APIError):
    """A 400 about one request field, named by `param` (OpenAI's `error.param`)."""

    def __init__(self, param: str, message: str, *, code: str = "invalid_value", status_code: int = 400) -> None:
        super().__init__(status_code, message, param=param, code=code)


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    error_type = _TYPE_BY_STATUS.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status_code: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    if param is not None:
        return InvalidParameter(param, message)
    return APIError(400, message)


def from_value_error(exc: ValueError, param_names: dict[str, str] | None = None) -> APIError:
    """A ValueError from SamplingParams or the engine starts with the field it is about ("max_tokens must ...").

    `param_names` maps our internal field names to the request's (chat's `top_logprobs` is SamplingParams'
    `logprobs`; chat's `prompt` is `messages`).
    """
    message = str(exc)
    param_of_error = getattr(exc, "param", None)  # inferd.errors.InvalidParameterError names its field
    if isinstance(param_of_error, str):
        public = (param_names or {}).get(param_of_error, param_of_error)
        if message.startswith(param_of_error):
            message = public + message[len(param_of_error):]
        return InvalidParameter(public, message)
    first_word = message.split(" ", 1)[0].rstrip(":")
    param = first_word if first_word.isidentifier() else None
    if param is not None and param_names and param in param_names:
        public = param_names[param]
        message = public + message[len(param):]
        param = public
    return bad_request(message, param)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages': the top-level request field at fault."""
    fields = [part for part in loc if part != "body"]
    return str(fields[0]) if fields and isinstance(fields[0], str) else None


def _field_path(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; union branch tags like 'list[int]' are dropped."""
    path = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict") or part.startswith("function-"):
            continue
        else:
            path += f".{part}" if path else part
    return path


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        position = loc[1] if len(loc) > 1 else "?"
        return bad_request(f"request body is not valid JSON: {detail} at byte {position}")
    if first.get("type") == "missing" and loc == ("body",):
        return bad_request("request body is required: a JSON object (Content-Type: application/json)")
    if first.get("type") in ("model_attributes_type", "dict_type", "model_type") and len(loc) <= 1:
        return bad_request("request body must be a JSON object (Content-Type: application/json)")
    param = _param_from_loc(loc)
    path = _field_path(loc) or "body"
    if first.get("type") == "value_error":  # our validators' own messages, without pydantic's prefix
        first = {**first, "msg": str(first.get("msg", "")).removeprefix("Value error, ")}
    # A union field (completions' prompt) reports one error per branch; name the field once.
    message = f"{path}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1 and all(_param_from_loc(tuple(e.get("loc", ()))) == param for e in errors):
        message = f"{param}: invalid type or value ({first.get('msg', 'invalid value')})"
    return bad_request(message, param)


async def _handle_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status_code, exc.message, exc.param, exc.code, exc.headers)


async def _handle_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    api_error = validation_error_to_api_error(exc)
    return error_response(api_error.status_code, api_error.message, api_error.param, api_error.code)


async def _handle_http_exception(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route for {_request.method} {_request.url.path}"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    # Starlette re-raises after this response and the connection is closed: say so, so clients do not reuse it.
    return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", headers={"Connection": "close"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)
