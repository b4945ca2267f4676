"""Layer 5: the Open Inference Protocol v2 (KServe v2 / Triton) over REST, for the tabular models of the table.

    GET  /v2                                      server metadata (name, version, extensions)
    GET  /v2/health/live | /v2/health/ready       200 or 503
    GET  /v2/models/{name}[/versions/{v}]         model metadata: versions, platform, inputs, outputs
    GET  /v2/models/{name}[/versions/{v}]/ready   200 or 503 (404 unknown model or version)
    GET  /v2/models/{name}[/versions/{v}]/config  the model's configuration (Triton's JSON form)
    POST /v2/models/{name}[/versions/{v}]/infer   JSON tensors, or Triton's binary tensor extension
    POST /v2/repository/index                     [{name, version, state, reason}]
    POST /v2/repository/models/{name}/load|unload

Errors leave in OIP's shape `{"error": "message"}`: 400 bad request (the message names the input or field),
404 unknown model or version, 429 queue full, 503 not ready or unloading.

Binary tensors (what `tritonclient.http` sends by default): the request's first `Inference-Header-Content-Length`
bytes are its JSON; each input with `parameters.binary_data_size` takes that many raw little-endian bytes after
it, in order (BYTES elements as a 4-byte length then the bytes). An output is sent binary when it asks for
`binary_data` or the request sets `binary_data_output`; its JSON then carries `binary_data_size` instead of data.
"""

from __future__ import annotations

import json
import math
import struct
import time
import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

import inferd
from inferd.batching import BatcherStoppedError, QueueFullError
from inferd.server.bodies import read_asgi_body
from inferd.server.fast_http import HotRoute, oip_error_body
from inferd.serving import ModelKind, ModelSpec
from inferd.tabular import TabularEngine, TensorError, decode_tensor, encode_tensor, list_repository
from inferd.tabular.datatypes import oip_datatype_of, oip_to_triton
from inferd.tabular.tensors import check_datatype, check_shape

router = APIRouter()

HEADER_LENGTH_KEY = "inference-header-content-length"
HEADER_LENGTH_KEY_BYTES = HEADER_LENGTH_KEY.encode()
SERVER_EXTENSIONS = ["model_repository", "binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"
_REQUEST_COUNTER = itertools.count()  # ids for requests that bring none (abort needs one)


class OIPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json",
                    headers=dict(headers) if headers else None)  # fmt: skip


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


# ---------------------------------------------------------------------------------------------- the model table


def _state(request: Request) -> Any:
    return request.app.state.inferd


def served_tabular(state: Any) -> dict[str, Any]:
    """Name -> model-table row of every tabular model the table holds (loading, failed and unloaded ones too)."""
    return {name: served for name, served in state.models.items() if served.kind is ModelKind.TABULAR}


def _is_unloaded(served: Any) -> bool:
    return getattr(served, "status", "ready") == "unloaded"


def _tabular_names(state: Any) -> list[str]:
    return sorted(name for name, served in served_tabular(state).items() if not _is_unloaded(served))


def _engine(request: Request, name: str) -> TabularEngine:
    return engine_of(_state(request), name)


def engine_of(state: Any, name: str) -> TabularEngine:
    """The engine of a served tabular model; OIPError 404 / 400 / 503 otherwise (shared with grpc_oip.py)."""
    served = state.models.get(name)
    if served is None or _is_unloaded(served):
        raise OIPError(404, f"unknown model {name!r}; tabular models served: {_tabular_names(state)}")
    if served.kind is not ModelKind.TABULAR:
        raise OIPError(400, f"model {name!r} is a {served.kind.value} model; the v2 protocol serves tabular models")
    status = getattr(served, "status", "ready")
    if status == "failed":
        raise OIPError(503, f"model {name!r} failed to load: {getattr(served, 'load_error', '')}")
    engine = getattr(served, "engine", None)
    if engine is None:
        raise OIPError(503, f"model {name!r} is loading; retry shortly")
    return engine


def version_of(engine: TabularEngine, version: str | None) -> int | None:
    if version is None:
        return None
    if not version.isdigit() or int(version) not in engine.versions:
        raise OIPError(404, f"model {engine.name!r} has no version {version!r}; served versions: {[str(v) for v in engine.versions]}")
    return int(version)


def model_repository_of(state: Any) -> Path | None:
    repo = getattr(state, "model_repository", None) or getattr(getattr(state, "options", None), "model_repository", None)
    return Path(repo) if repo else None


def observe_request(state: Any, name: str, status: str, started: float, num_rows: int) -> None:
    metrics = getattr(state, "metrics", None)
    observe = getattr(metrics, "observe_request", None)
    if observe is not None:
        observe(name, ModelKind.TABULAR, status, time.monotonic() - started, num_rows, 0)


# ---------------------------------------------------------------------------------------------- server


@router.get("/v2")
async def server_metadata() -> Response:
    return _json({"name": "inferd", "version": inferd.__version__, "extensions": SERVER_EXTENSIONS})


@router.get("/v2/health/live")
async def health_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def health_ready(request: Request) -> Response:
    state = _state(request)
    if getattr(state, "is_draining", False):
        return _error(503, "server is shutting down")
    not_ready = [name for name, served in served_tabular(state).items()
                 if not _is_unloaded(served) and (served.engine is None or not served.engine.is_running)]  # fmt: skip
    if not_ready:
        return _error(503, f"models not ready: {not_ready}")
    return Response(status_code=200)


# ---------------------------------------------------------------------------------------------- models


def model_metadata_of(engine: TabularEngine, version: int | None) -> dict[str, Any]:
    config = engine.config(version)
    return {
        "name": engine.name,
        "versions": [str(v) for v in (engine.versions if version is None else [version])],
        "platform": PLATFORM,
        "inputs": [t.to_metadata(config.max_batch_size) for t in config.inputs],
        "outputs": [t.to_metadata(config.max_batch_size) for t in config.outputs],
    }


def _config_json(engine: TabularEngine, version: int | None) -> dict[str, Any]:
    config = engine.config(version)

    def tensor(t: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"name": t.name, "data_type": oip_to_triton(t.datatype), "dims": [str(d) for d in t.dims]}
        if t.model_dims is not None:
            body["reshape"] = {"shape": [str(d) for d in t.model_dims]}
        return body

    body: dict[str, Any] = {
        "name": engine.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": config.max_batch_size,
        "input": [tensor(t) for t in config.inputs],
        "output": [tensor(t) for t in config.outputs],
        "instance_group": [{"count": config.instance_count, "kind": config.instance_kind}],
    }
    if config.dynamic_batching is not None:
        body["dynamic_batching"] = {
            "preferred_batch_size": list(config.dynamic_batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": str(config.dynamic_batching.max_queue_delay_us),
        }
    return body


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    try:
        engine = _engine(request, name)
        return _json(model_metadata_of(engine, version_of(engine, version)))
    except OIPError as exc:
        return _error(exc.status, exc.message)


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(request: Request, name: str, version: str | None = None) -> Response:
    try:
        engine = _engine(request, name)
        return _json(_config_json(engine, version_of(engine, version)))
    except OIPError as exc:
        return _error(exc.status, exc.message)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    try:
        engine = _engine(request, name)
        number = version_of(engine, version)
    except OIPError as exc:
        return _error(exc.status, exc.message)
    is_ready = engine.is_running if number is None else engine.is_version_ready(number)
    return Response(status_code=200) if is_ready else _error(503, f"model {name!r} is not ready")


# ---------------------------------------------------------------------------------------------- infer


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(the JSON request, the binary tensor bytes after it)."""
    json_length = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise OIPError(400, f"Inference-Header-Content-Length {header_length!r} is not a length within the body")
        json_length = int(header_length)
    try:
        parsed = json.loads(body[:json_length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise OIPError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise OIPError(400, "the request body must be a JSON object with an 'inputs' list")
    return parsed, memoryview(body)[json_length:]


def decode_binary_tensor(name: str, datatype: Any, shape: Any, raw: memoryview) -> np.ndarray:
    dtype = check_datatype(name, datatype)
    shape = check_shape(name, shape)
    num_elements = math.prod(shape)
    if datatype == "BYTES":
        values: list[bytes] = []
        offset = 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise TensorError(f"input {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            values.append(bytes(raw[offset + 4 : offset + 4 + length]))
            offset += 4 + length
        if len(values) != num_elements or offset != len(raw):
            raise TensorError(f"input {name!r}: binary data has {len(values)} elements but shape {list(shape)} needs {num_elements}")
        return np.array(values, dtype=object).reshape(shape)
    if len(raw) != num_elements * dtype.itemsize:
        raise TensorError(
            f"input {name!r}: binary data has {len(raw)} bytes but shape {list(shape)} of {datatype} needs "
            f"{num_elements * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _read_inputs(request_json: dict[str, Any], binary: memoryview) -> dict[str, np.ndarray]:
    inputs = request_json.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OIPError(400, "'inputs' must be a non-empty list of tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise OIPError(400, f"inputs[{index}] must be an object with a 'name'")
        name = tensor["name"]
        if name in arrays:
            raise OIPError(400, f"input {name!r} is given twice")
        for key in ("datatype", "shape"):
            if key not in tensor:
                raise OIPError(400, f"input {name!r}: '{key}' is required")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise OIPError(400, f"input {name!r}: 'parameters' must be an object")
        binary_size = parameters.get("binary_data_size")
        if binary_size is not None:
            if "data" in tensor:
                raise OIPError(400, f"input {name!r}: give either 'data' or binary_data_size, not both")
            if not isinstance(binary_size, int) or binary_size < 0 or offset + binary_size > len(binary):
                raise OIPError(400, f"input {name!r}: binary_data_size {binary_size!r} runs past the request body")
            arrays[name] = decode_binary_tensor(name, tensor["datatype"], tensor["shape"], binary[offset : offset + binary_size])
            offset += binary_size
        else:
            if "data" not in tensor:
                raise OIPError(400, f"input {name!r}: 'data' is required")
            arrays[name] = decode_tensor(name, tensor["datatype"], tensor["shape"], tensor["data"])
    if offset != len(binary):
        raise OIPError(400, f"the request carries {len(binary) - offset} binary bytes no input claims")
    return arrays


def _requested_outputs(request_json: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool]]:
    """(output names or None for all, output name -> send binary)"""
    parameters = request_json.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise OIPError(400, "'parameters' must be an object")
    all_binary = parameters.get("binary_data_output") is True
    outputs = request_json.get("outputs")
    if outputs is None:
        return None, {"*": all_binary}
    if not isinstance(outputs, list):
        raise OIPError(400, "'outputs' must be a list of {name, parameters}")
    names: list[str] = []
    binary: dict[str, bool] = {"*": all_binary}
    for index, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise OIPError(400, f"outputs[{index}] must be an object with a 'name'")
        output_parameters = output.get("parameters") or {}
        if not isinstance(output_parameters, dict):
            raise OIPError(400, f"output {output['name']!r}: 'parameters' must be an object")
        names.append(output["name"])
        binary[output["name"]] = bool(output_parameters.get("binary_data", all_binary))
    return names, binary


def encode_binary_tensor(array: np.ndarray) -> bytes:
    if array.dtype == object:
        parts = []
        for value in array.reshape(-1):
            data = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _response(model_name: str, result: Any, request_id: Any, binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """(the response body, its headers) of a finished infer."""
    outputs_json: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in result.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": oip_datatype_of(array), "shape": list(array.shape)}
        if binary.get(name, binary["*"]):
            data = encode_binary_tensor(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = encode_tensor(array)
        outputs_json.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": str(result.version), "outputs": outputs_json}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream",
                                          "inference-header-content-length": str(len(header))}


def _error_answer(status: int, message: str, headers: Mapping[str, str] | None = None,
                  ) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps({"error": message}, separators=(",", ":")).encode(), {
        "content-type": "application/json", **(headers or {})}


async def infer_answer(state: Any, name: str, version: str | None, body: bytes, header_length: str | None,
                       ) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of one infer request: the work of both the Starlette route and the raw ASGI path."""
    started = time.monotonic()
    num_rows = 0
    try:
        engine = engine_of(state, name)
        number = version_of(engine, version)
        request_json, binary = _split_body(body, header_length)
        request_id = request_json.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise OIPError(400, "'id' must be a string")
        output_names, binary_outputs = _requested_outputs(request_json)
        inputs = _read_inputs(request_json, binary)
        num_rows = next(iter(inputs.values())).shape[0] if inputs else 0
        result = await engine.infer(
            inputs, version=number, output_names=output_names, request_id=f"oip-{next(_REQUEST_COUNTER)}"
        )
    except OIPError as exc:
        observe_request(state, name, "error", started, num_rows)
        return _error_answer(exc.status, exc.message)
    except TensorError as exc:
        observe_request(state, name, "error", started, num_rows)
        return _error_answer(exc.status, str(exc))
    except QueueFullError as exc:
        observe_request(state, name, "rejected", started, num_rows)
        return _error_answer(429, str(exc), {"retry-after": "1"})
    except BatcherStoppedError as exc:
        observe_request(state, name, "error", started, num_rows)
        return _error_answer(503, str(exc))
    observe_request(state, name, "ok", started, num_rows)
    payload, headers = _response(name, result, request_id, binary_outputs)
    return 200, payload, headers


async def infer(request: Request) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer as a Starlette route. `inferd serve` answers these paths
    before FastAPI with `infer_asgi`; this route serves the app when it runs without that wrapper (TestClient)."""
    status, payload, headers = await infer_answer(
        _state(request), request.path_params["name"], request.path_params.get("version"), await request.body(),
        request.headers.get(HEADER_LENGTH_KEY),
    )
    return Response(payload, status_code=status, headers=headers)


INFER_PATH_RE = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


def infer_asgi_app(state: Any) -> ASGIApp:
    """The same infer as a bare ASGI app over `state`, for `HotPaths` (server/app.py): a one-row request spends
    about half its CPU in Starlette's and FastAPI's middleware, routing and Response objects, which this skips."""

    async def infer_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH_RE.fullmatch(scope["path"])  # uvicorn's path is already percent-decoded
        assert match is not None, scope["path"]
        body = await read_asgi_body(receive)
        if body is None:
            return
        header_length = None
        for key, value in scope["headers"]:
            if key == HEADER_LENGTH_KEY_BYTES:
                header_length = value.decode("latin-1")
                break
        status, payload, headers = await infer_answer(state, match.group(1), match.group(2), body,
                                                      header_length)  # fmt: skip
        raw_headers = [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
        raw_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})

    return infer_asgi


INFER_RAW_PATH_RE = re.compile(rb"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


def infer_hot_route(state: Any) -> HotRoute:
    """The same infer answered inside the HTTP protocol (server/fast_http.py): `inferd serve` answers it there,
    without an ASGI cycle, whenever uvicorn runs its httptools protocol."""

    async def answer(match: re.Match[bytes], body: bytes, headers: Sequence[tuple[bytes, bytes]],
                     ) -> tuple[int, bytes, dict[str, str]]:
        header_length = None
        for key, value in headers:
            if key == HEADER_LENGTH_KEY_BYTES:
                header_length = value.decode("latin-1")
                break
        version = match.group(2)
        return await infer_answer(state, match.group(1).decode("latin-1"),
                                  None if version is None else version.decode("latin-1"), body, header_length)

    return HotRoute(INFER_RAW_PATH_RE, answer, "OIP infer", oip_error_body)


# The hot path skips FastAPI's per-request dependency solving and validation (it reads the body itself), which
# on one core costs about as much as the rest of a one-row infer.
router.add_route("/v2/models/{name}/infer", infer, methods=["POST"], include_in_schema=False)
router.add_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"], include_in_schema=False)


# ---------------------------------------------------------------------------------------------- repository


def repository_entries(state: Any, *, is_ready_only: bool = False) -> list[dict[str, Any]]:
    """The repository index: one entry per served version, one per repository model not loaded."""
    served = served_tabular(state)
    entries: list[dict[str, Any]] = []
    repo = model_repository_of(state)
    names = sorted(set(served) | (set(list_repository(repo)) if repo is not None else set()))
    for name in names:
        model = served.get(name)
        engine = getattr(model, "engine", None) if model is not None else None
        status = getattr(model, "status", "ready") if model is not None else "unloaded"
        if model is None or status == "unloaded":
            entries.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})
        elif status == "failed":
            entries.append({"name": name, "state": "UNAVAILABLE", "reason": str(getattr(model, "load_error", ""))})
        elif engine is None:
            entries.append({"name": name, "state": "LOADING", "reason": ""})
        else:
            for version in engine.versions:
                ready = engine.is_version_ready(version)
                entries.append({"name": name, "version": str(version), "state": "READY" if ready else "UNAVAILABLE",
                                "reason": "" if ready else "unloading"})  # fmt: skip
    return [e for e in entries if e["state"] == "READY"] if is_ready_only else entries


async def load_from_repository(state: Any, name: str) -> None:
    """(Re)load a model from the repository; OIPError 400 / 404 otherwise."""
    repo = model_repository_of(state)
    if repo is None:
        raise OIPError(400, "this server has no model repository (start it with --model-repository DIR)")
    models = list_repository(repo)
    model_dir = models.get(name)
    if model_dir is None:
        raise OIPError(404, f"no model {name!r} in the repository {str(repo)!r}; it holds {sorted(models)}")
    existing = state.models.get(name)
    if existing is not None and existing.kind is not ModelKind.TABULAR:
        raise OIPError(400, f"model name {name!r} is taken by a {existing.kind.value} model")
    # A loaded model is loaded again from disk, as Triton does; a failure is a 400 (the server stays up).
    try:
        served = await state.load_model(ModelSpec(name=name, source=str(model_dir), kind=ModelKind.TABULAR))
    except (ValueError, ImportError) as exc:
        raise OIPError(400, f"model {name!r} failed to load: {exc}") from None
    if getattr(served, "status", "ready") == "failed":
        raise OIPError(400, f"model {name!r} failed to load: {served.load_error}")


async def unload(state: Any, name: str) -> None:
    served = state.models.get(name)
    if served is None or served.kind is not ModelKind.TABULAR or _is_unloaded(served):
        raise OIPError(404, f"unknown model {name!r}; tabular models served: {_tabular_names(state)}")
    await state.unload_model(name)


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> Response:
    is_ready_only = False
    body = await request.body()
    if body.strip():
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            return _error(400, f"the request body is not valid JSON: {exc}")
        is_ready_only = isinstance(parsed, dict) and parsed.get("ready") is True
    return _json(repository_entries(_state(request), is_ready_only=is_ready_only))


@router.post("/v2/repository/models/{name}/load")
async def repository_load(request: Request, name: str) -> Response:
    try:
        await load_from_repository(_state(request), name)
    except OIPError as exc:
        return _error(exc.status, exc.message)
    return Response(status_code=200)


@router.post("/v2/repository/models/{name}/unload")
async def repository_unload(request: Request, name: str) -> Response:
    try:
        await unload(_state(request), name)
    except OIPError as exc:
        return _error(exc.status, exc.message)
    return Response(status_code=200)


# Starlette tries routes in order; the infer routes, the hot path, go first.
router.routes.sort(key=lambda route: not getattr(route, "path", "").endswith("/infer"))
