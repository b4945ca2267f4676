"""Layer 5: the Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`) on its own port.

    server = await start_grpc_server(state, "127.0.0.1", 8001)   # on the server's event loop
    ...
    await server.stop(grace_s=5.0)

The one module that imports grpc. Same model table, checks and engine calls as the REST routes
(routes/oip.py); errors map to gRPC status codes: 400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND,
429 -> RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE. Tensors arrive as typed `contents` or `raw_input_contents`
(what tritonclient sends); outputs leave as `raw_output_contents`.
"""

from __future__ import annotations

import logging
import time
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

import inferd
from inferd.batching import BatcherStoppedError, QueueFullError
from inferd.server.oip_grpc import inference_pb2 as pb
from inferd.server.state import is_bearer_authorized
from inferd.server.routes.oip import (
    PLATFORM,
    SERVER_EXTENSIONS,
    OIPError,
    decode_binary_tensor,
    encode_binary_tensor,
    engine_of,
    load_from_repository,
    model_metadata_of,
    observe_request,
    repository_entries,
    served_tabular,
    unload,
    version_of,
)
from inferd.tabular import TensorError, decode_tensor
from inferd.tabular.datatypes import oip_datatype_of
from inferd.tabular.tensors import check_datatype, check_shape

logger = logging.getLogger("inferd.server")

SERVICE_NAME = "inference.GRPCInferenceService"
# Typed contents field per OIP datatype (FP16 has none: it travels in raw_input_contents only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
MAX_MESSAGE_BYTES = 64 << 20
_REQUEST_COUNTER = itertools.count()


def _grpc() -> Any:
    try:
        import grpc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the gRPC endpoint needs grpcio: pip install 'inferd[tabular]'") from exc
    return grpc


def _status_code(status: int) -> Any:
    codes = _grpc().StatusCode
    return {400: codes.INVALID_ARGUMENT, 404: codes.NOT_FOUND, 429: codes.RESOURCE_EXHAUSTED, 503: codes.UNAVAILABLE}.get(
        status, codes.INTERNAL
    )


def _decode_contents(tensor: Any) -> np.ndarray:
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    check_datatype(name, datatype)
    check_shape(name, shape)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    values = list(getattr(tensor.contents, field))
    if datatype == "BYTES":
        array = np.array(values, dtype=object)
        if array.size != int(np.prod(shape)):
            raise TensorError(f"input {name!r}: data has {array.size} elements but shape {shape} needs {int(np.prod(shape))}")
        return array.reshape(shape)
    return decode_tensor(name, datatype, shape, values)


class _Servicer:
    def __init__(self, state: Any) -> None:
        self.state = state

    async def server_live(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        models = [m for m in served_tabular(self.state).values() if getattr(m, "status", "ready") != "unloaded"]
        is_ready = not getattr(self.state, "is_draining", False) and all(
            m.engine is not None and m.engine.is_running for m in models
        )
        return pb.ServerReadyResponse(ready=is_ready)

    async def server_metadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="inferd", version=inferd.__version__, extensions=SERVER_EXTENSIONS)

    async def model_ready(self, request: Any, context: Any) -> Any:
        engine = engine_of(self.state, request.name)
        number = version_of(engine, request.version or None)
        is_ready = engine.is_running if number is None else engine.is_version_ready(number)
        return pb.ModelReadyResponse(ready=is_ready)

    async def model_metadata(self, request: Any, context: Any) -> Any:
        engine = engine_of(self.state, request.name)
        metadata = model_metadata_of(engine, version_of(engine, request.version or None))
        response = pb.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"], platform=PLATFORM)
        for role in ("inputs", "outputs"):
            for tensor in metadata[role]:
                getattr(response, role).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    async def model_infer(self, request: Any, context: Any) -> Any:
        started = time.monotonic()
        num_rows = 0
        try:
            engine = engine_of(self.state, request.model_name)
            number = version_of(engine, request.model_version or None)
            raw = list(request.raw_input_contents)
            if raw and len(raw) != len(request.inputs):
                raise OIPError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
            inputs: dict[str, np.ndarray] = {}
            for index, tensor in enumerate(request.inputs):
                if tensor.name in inputs:
                    raise OIPError(400, f"input {tensor.name!r} is given twice")
                if raw:
                    inputs[tensor.name] = decode_binary_tensor(tensor.name, tensor.datatype, list(tensor.shape), memoryview(raw[index]))
                else:
                    inputs[tensor.name] = _decode_contents(tensor)
            if not inputs:
                raise OIPError(400, "'inputs' must be a non-empty list of tensors")
            num_rows = next(iter(inputs.values())).shape[0] if next(iter(inputs.values())).ndim else 1
            output_names = [o.name for o in request.outputs] or None
            result = await engine.infer(inputs, version=number, output_names=output_names, request_id=f"oip-grpc-{next(_REQUEST_COUNTER)}")
        except (OIPError, TensorError, QueueFullError, BatcherStoppedError) as exc:
            status = getattr(exc, "status", 429 if isinstance(exc, QueueFullError) else 503)
            observe_request(self.state, request.model_name, "rejected" if status == 429 else "error", started, num_rows)
            await context.abort(_status_code(status), getattr(exc, "message", str(exc)))
            raise  # unreachable: abort raises
        observe_request(self.state, request.model_name, "ok", started, num_rows)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(result.version), id=request.id)
        for name, array in result.outputs.items():
            response.outputs.add(name=name, datatype=oip_datatype_of(array), shape=list(array.shape))
            response.raw_output_contents.append(encode_binary_tensor(array))
        return response

    async def repository_index(self, request: Any, context: Any) -> Any:
        response = pb.RepositoryIndexResponse()
        for entry in repository_entries(self.state, is_ready_only=request.ready):
            response.models.add(name=entry["name"], version=entry.get("version", ""), state=entry["state"], reason=entry["reason"])
        return response

    async def repository_model_load(self, request: Any, context: Any) -> Any:
        await load_from_repository(self.state, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any, context: Any) -> Any:
        await unload(self.state, request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _handler(method: Callable[[Any, Any], Any], request_type: Any, response_type: Any, state: Any,
             is_open: bool = False) -> Any:
    """A unary handler; unless `is_open` (the health probes, open over HTTP too) it asks for the server's API key."""
    grpc = _grpc()
    api_keys = () if is_open else tuple(key.encode() for key in state.options.api_keys)

    async def call(request: Any, context: Any) -> Any:
        if api_keys:  # the HTTP server's keys guard this port too (metadata `authorization: Bearer KEY`)
            authorization = next((value for key, value in context.invocation_metadata() or ()
                                  if key == "authorization"), None)  # fmt: skip
            if not is_bearer_authorized(authorization.encode() if isinstance(authorization, str) else authorization,
                                        api_keys):  # fmt: skip
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or incorrect API key (send metadata authorization: Bearer <key>)")
        try:
            return await method(request, context)
        except OIPError as exc:
            await context.abort(_status_code(exc.status), exc.message)
        except TensorError as exc:
            await context.abort(_status_code(exc.status), str(exc))

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
    )


class GrpcServer:
    def __init__(self, server: Any, port: int) -> None:
        self._server = server
        self.port = port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        await self._server.stop(grace_s)


async def start_grpc_server(state: Any, host: str, port: int) -> GrpcServer:
    """Serve the OIP v2 gRPC service for `state`'s tabular models on host:port (0: a free port)."""
    grpc = _grpc()
    servicer = _Servicer(state)
    handlers = {
        "ServerLive": _handler(servicer.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse, state, True),
        "ServerReady": _handler(servicer.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse, state, True),
        "ServerMetadata": _handler(servicer.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse, state),
        "ModelReady": _handler(servicer.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse, state),
        "ModelMetadata": _handler(servicer.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse, state),
        "ModelInfer": _handler(servicer.model_infer, pb.ModelInferRequest, pb.ModelInferResponse, state),
        "RepositoryIndex": _handler(servicer.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse, state),
        "RepositoryModelLoad": _handler(servicer.repository_model_load, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse, state),
        "RepositoryModelUnload": _handler(servicer.repository_model_unload, pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse, state),
    }  # fmt: skip
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    logger.info("OIP v2 gRPC on %s:%d", host, bound_port)
    return GrpcServer(server, bound_port)
