"""A tabular model's configuration: Triton's config.pbtxt fields that inferd serves, derived from the ONNX graph
when absent (as Triton's auto-complete does) and checked against the graph when given.

Shapes: `dims` exclude the batch dimension when `max_batch_size` > 0 (Triton's convention); -1 is any size.
A request's tensor then has shape [batch, *dims] with 1 <= batch <= max_batch_size.

Supported config.pbtxt fields (others are reported and ignored):
    name, platform ("onnxruntime_onnx") / backend ("onnxruntime"), max_batch_size, default_model_filename,
    input/output [{name, data_type, dims, reshape {shape}, optional}], version_policy {latest|all|specific},
    dynamic_batching {preferred_batch_size, max_queue_delay_microseconds, default_queue_policy ignored},
    instance_group [{count, kind}], parameters {intra_op_thread_count, inter_op_thread_count, allow_nan, executor}.

`executor` (inferd's own parameter): "loop" (default) runs each batch on the server's event loop, where requests
arriving together are merged with no thread hop (tree models score a row in microseconds; a hop costs more);
"thread" runs batches on `instance_count` worker threads, for models whose batches take milliseconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from inferd.tabular.datatypes import triton_to_oip
from inferd.tabular.pbtxt import PbtxtError, parse_pbtxt

logger = logging.getLogger("inferd.tabular")

# A derived config's max batch size: trees score ~4.5 us/row in a batch, so 1024 rows are ~5 ms of work.
DEFAULT_MAX_BATCH_SIZE = 1024
EXECUTORS = ("loop", "thread")
MAX_QUEUE_DELAY_US = 10_000_000  # the batcher waits 10 s at most
_SUPPORTED_PLATFORMS = ("onnxruntime_onnx", "")
_SUPPORTED_BACKENDS = ("onnxruntime", "")
_IGNORED_FIELDS = ("optimization", "model_warmup", "model_operations", "model_transaction_policy", "response_cache")


@dataclass(frozen=True)
class TensorConfig:
    name: str
    datatype: str  # OIP datatype, e.g. "FP32"
    dims: tuple[int, ...]  # without the batch dimension when max_batch_size > 0; -1 = any size
    model_dims: tuple[int, ...] | None = None  # Triton's `reshape`: the shape the model sees, None = dims
    is_optional: bool = False

    def to_metadata(self, max_batch_size: int) -> dict[str, Any]:
        shape = ([-1] if max_batch_size > 0 else []) + list(self.dims)
        return {"name": self.name, "datatype": self.datatype, "shape": shape}


@dataclass(frozen=True)
class DynamicBatchingConfig:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1  # for "latest"
    versions: tuple[int, ...] = ()  # for "specific"

    def select(self, available: Sequence[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :] if self.num_versions > 0 else []


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    max_batch_size: int = 0  # 0: requests carry no batch dimension and are never merged
    dynamic_batching: DynamicBatchingConfig | None = None  # None: each request runs alone
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"  # KIND_CPU | KIND_GPU | KIND_AUTO
    intra_op_threads: int = 0  # onnxruntime's default (one per core) when 0
    inter_op_threads: int = 0
    allow_nan: bool = True  # NaN in a float input (trees read it as "missing"); False -> 400
    executor: str = "loop"  # "loop": batches run on the server's event loop; "thread": on instance_count threads
    default_model_filename: str = "model.onnx"
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    platform: str = "onnxruntime_onnx"

    def input(self, name: str) -> TensorConfig | None:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        return None

    def output(self, name: str) -> TensorConfig | None:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        return None


# ---------------------------------------------------------------------------------------------- reading


def _one(fields: Mapping[str, list[Any]], key: str, default: Any, where: str) -> Any:
    values = fields.get(key)
    if not values:
        return default
    if len(values) > 1:
        raise ValueError(f"{where}: field {key!r} is given {len(values)} times")
    return values[0]


def _int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _bool_string(value: str, key: str, where: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"{where}: parameter {key!r} must be true or false, got {value!r}")


def _tensor(fields: Mapping[str, list[Any]], where: str) -> TensorConfig:
    name = _one(fields, "name", None, where)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: every input and output needs a name")
    where = f"{where} {name!r}"
    for key in fields:
        if key not in ("name", "data_type", "dims", "reshape", "optional", "format", "label_filename"):
            raise ValueError(f"{where}: field {key!r} is not supported")
    data_type = _one(fields, "data_type", None, where)
    if data_type is None:
        raise ValueError(f"{where}: data_type is required")
    dims = tuple(_int(d, "dims", where) for d in fields.get("dims", []))
    if any(d < -1 or d == 0 for d in dims):
        raise ValueError(f"{where}: dims must be positive or -1, got {list(dims)}")
    model_dims = None
    reshape = _one(fields, "reshape", None, where)
    if reshape is not None:
        model_dims = tuple(_int(d, "reshape.shape", where) for d in reshape.get("shape", []))
    is_optional = str(_one(fields, "optional", "false", where)).lower() == "true"
    return TensorConfig(name, triton_to_oip(str(data_type)), dims, model_dims, is_optional)


def config_from_pbtxt(text: str, *, model_name: str, where: str = "config.pbtxt") -> ModelConfig:
    """Read a Triton config.pbtxt. Inputs/outputs may be empty (auto-complete fills them from the graph)."""
    try:
        fields = parse_pbtxt(text)
    except PbtxtError as exc:
        raise ValueError(f"{where}: {exc}") from None
    name = _one(fields, "name", model_name, where)
    if name != model_name:
        raise ValueError(f"{where}: name {name!r} differs from the model's directory name {model_name!r}")
    platform = _one(fields, "platform", "", where)
    backend = _one(fields, "backend", "", where)
    if platform not in _SUPPORTED_PLATFORMS or backend not in _SUPPORTED_BACKENDS:
        raise ValueError(
            f"{where}: platform {platform!r} / backend {backend!r} is not served; inferd serves "
            "platform 'onnxruntime_onnx' or backend 'onnxruntime' (XGBoost/LightGBM files are converted to ONNX)"
        )
    for key in fields:
        if key in _IGNORED_FIELDS:
            logger.warning("%s: field %r is ignored by inferd", where, key)
        elif key not in (
            "name", "platform", "backend", "max_batch_size", "input", "output", "dynamic_batching",
            "instance_group", "parameters", "version_policy", "default_model_filename",
        ):  # fmt: skip
            raise ValueError(f"{where}: field {key!r} is not supported")
    max_batch_size = _int(_one(fields, "max_batch_size", 0, where), "max_batch_size", where)
    if max_batch_size < 0:
        raise ValueError(f"{where}: max_batch_size must be >= 0, got {max_batch_size}")
    inputs = tuple(_tensor(t, f"{where}: input") for t in fields.get("input", []))
    outputs = tuple(_tensor(t, f"{where}: output") for t in fields.get("output", []))

    dynamic_batching = None
    batching_fields = _one(fields, "dynamic_batching", None, where)
    if batching_fields is not None:
        preferred = tuple(_int(v, "preferred_batch_size", where) for v in batching_fields.get("preferred_batch_size", []))
        delay_us = _int(_one(batching_fields, "max_queue_delay_microseconds", 0, where), "max_queue_delay_microseconds", where)
        if not 0 <= delay_us <= MAX_QUEUE_DELAY_US:
            raise ValueError(f"{where}: max_queue_delay_microseconds must be in [0, {MAX_QUEUE_DELAY_US}], got {delay_us}")
        dynamic_batching = DynamicBatchingConfig(preferred, delay_us)

    instance_count, instance_kind = 1, "KIND_AUTO"
    groups = fields.get("instance_group", [])
    if len(groups) > 1:
        raise ValueError(f"{where}: one instance_group is supported, got {len(groups)}")
    if groups:
        instance_count = _int(_one(groups[0], "count", 1, where), "instance_group.count", where)
        instance_kind = str(_one(groups[0], "kind", "KIND_AUTO", where))
        if instance_kind not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
            raise ValueError(f"{where}: instance_group kind {instance_kind!r} is not supported")

    parameters: dict[str, str] = {}
    for entry in fields.get("parameters", []):
        key = _one(entry, "key", None, where)
        value = _one(entry, "value", {}, where)
        parameters[str(key)] = str(_one(value, "string_value", "", where))
    intra_op_threads = int(parameters.pop("intra_op_thread_count", "0") or 0)
    inter_op_threads = int(parameters.pop("inter_op_thread_count", "0") or 0)
    allow_nan = _bool_string(parameters.pop("allow_nan", "true"), "allow_nan", where)
    executor = parameters.pop("executor", "loop")
    if executor not in EXECUTORS:
        raise ValueError(f"{where}: parameter 'executor' must be one of {list(EXECUTORS)}, got {executor!r}")
    for key in parameters:
        logger.warning("%s: parameter %r is ignored by inferd", where, key)

    policy = VersionPolicy()
    policy_fields = _one(fields, "version_policy", None, where)
    if policy_fields is not None:
        if "all" in policy_fields:
            policy = VersionPolicy(kind="all")
        elif "specific" in policy_fields:
            versions = _one(policy_fields, "specific", {}, where).get("versions", [])
            policy = VersionPolicy(kind="specific", versions=tuple(_int(v, "versions", where) for v in versions))
        elif "latest" in policy_fields:
            latest = _one(policy_fields, "latest", {}, where)
            policy = VersionPolicy(kind="latest", num_versions=_int(_one(latest, "num_versions", 1, where), "num_versions", where))
    return ModelConfig(
        name=name,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        instance_count=instance_count,
        instance_kind=instance_kind,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        allow_nan=allow_nan,
        executor=executor,
        default_model_filename=str(_one(fields, "default_model_filename", "model.onnx", where)),
        version_policy=policy,
    )


# ---------------------------------------------------------------------------------------------- against the graph


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of the ONNX graph: its OIP datatype and shape (None = a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]


def _graph_dims(tensor: GraphTensor, has_batch_dim: bool) -> tuple[int, ...]:
    shape = tensor.shape[1:] if has_batch_dim else tensor.shape
    return tuple(-1 if d is None else d for d in shape)


def _can_batch(graph: Sequence[GraphTensor]) -> bool:
    return all(len(t.shape) >= 1 and t.shape[0] is None for t in graph)


def complete_config(
    config: ModelConfig | None, name: str, graph_inputs: Sequence[GraphTensor], graph_outputs: Sequence[GraphTensor]
) -> ModelConfig:
    """Fill what the config leaves out from the graph (Triton's auto-complete) and check what it gives.

    No config: every graph input and output, max_batch_size DEFAULT_MAX_BATCH_SIZE when every tensor's first
    dimension is dynamic (else 0), dynamic batching on with no queue delay.
    """
    can_batch = _can_batch(list(graph_inputs) + list(graph_outputs))
    if config is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if can_batch else 0
        config = ModelConfig(
            name=name,
            inputs=(),
            outputs=(),
            max_batch_size=max_batch_size,
            dynamic_batching=DynamicBatchingConfig() if max_batch_size > 0 else None,
        )
    where = f"model {name!r}"
    if config.max_batch_size > 0 and not can_batch:
        fixed = [t.name for t in list(graph_inputs) + list(graph_outputs) if not t.shape or t.shape[0] is not None]
        raise ValueError(
            f"{where}: max_batch_size {config.max_batch_size} needs a dynamic first dimension on every tensor "
            f"of the ONNX graph; {fixed} have none (set max_batch_size: 0)"
        )
    has_batch_dim = config.max_batch_size > 0
    inputs = config.inputs or tuple(TensorConfig(t.name, t.datatype, _graph_dims(t, has_batch_dim)) for t in graph_inputs)
    outputs = config.outputs or tuple(TensorConfig(t.name, t.datatype, _graph_dims(t, has_batch_dim)) for t in graph_outputs)
    _check_tensors("input", inputs, graph_inputs, has_batch_dim, where)
    _check_tensors("output", outputs, graph_outputs, has_batch_dim, where)
    configured = {t.name for t in inputs}
    missing = [t.name for t in graph_inputs if t.name not in configured]
    if missing:
        raise ValueError(f"{where}: the ONNX graph's inputs {missing} are missing from the config")
    return replace(config, inputs=inputs, outputs=outputs)


def _check_tensors(
    role: str, configured: Sequence[TensorConfig], graph: Sequence[GraphTensor], has_batch_dim: bool, where: str
) -> None:
    by_name = {t.name: t for t in graph}
    for tensor in configured:
        graph_tensor = by_name.get(tensor.name)
        if graph_tensor is None:
            raise ValueError(f"{where}: {role} {tensor.name!r} is not in the ONNX graph, whose {role}s are {list(by_name)}")
        if tensor.datatype != graph_tensor.datatype:
            raise ValueError(
                f"{where}: {role} {tensor.name!r} has data_type {tensor.datatype} in the config but "
                f"{graph_tensor.datatype} in the ONNX graph"
            )
        model_dims = tensor.model_dims if tensor.model_dims is not None else tensor.dims
        if tensor.model_dims is not None and -1 not in tensor.dims + tensor.model_dims:
            if math.prod(tensor.dims) != math.prod(tensor.model_dims):
                raise ValueError(f"{where}: {role} {tensor.name!r}: dims {list(tensor.dims)} and reshape {list(tensor.model_dims)} differ in size")
        graph_dims = _graph_dims(graph_tensor, has_batch_dim)
        # Outputs of tree converters often carry a made-up static shape; only their rank and fixed sizes are read.
        is_compatible = len(model_dims) == len(graph_dims) and all(
            g == -1 or c == g for c, g in zip(model_dims, graph_dims)
        )
        if not is_compatible:
            raise ValueError(
                f"{where}: {role} {tensor.name!r} has dims {list(model_dims)} in the config but the ONNX graph's "
                f"shape is {list(graph_tensor.shape)} ({'after' if has_batch_dim else 'with'} the batch dimension)"
            )
