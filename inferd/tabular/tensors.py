"""OIP v2 tensors on the wire <-> numpy arrays, shared by the REST (JSON) and gRPC front ends.

`decode_tensor(name, datatype, shape, data)` reads JSON `data` (flat or nested, row-major) strictly: the element
count must equal the shape's product, numbers must fit the datatype (no silent truncation of 1.5 to an INT64 or
of 300 to a UINT8), booleans are only true/false and BYTES only strings. Errors are TensorError naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from inferd.tabular.datatypes import NUMPY_DTYPES


class TensorError(ValueError):
    """A request's tensor is malformed; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TensorError(f"input {name!r}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise TensorError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return tuple(shape)


def check_datatype(name: str, datatype: Any) -> np.dtype:
    dtype = NUMPY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise TensorError(f"input {name!r}: datatype {datatype!r} is not one of {list(NUMPY_DTYPES)}")
    return dtype


def decode_tensor(name: str, datatype: Any, shape: Any, data: Any) -> np.ndarray:
    """JSON `data` -> an array of `shape` and the numpy dtype of `datatype`."""
    dtype = check_datatype(name, datatype)
    shape = check_shape(name, shape)
    if not isinstance(data, list):
        data = [data]
    try:
        raw = np.asarray(data)
    except ValueError:
        raise TensorError(f"input {name!r}: data is a ragged nested list; give it flat or as a full nested list") from None
    num_elements = math.prod(shape)
    if raw.size != num_elements:
        raise TensorError(f"input {name!r}: data has {raw.size} elements but shape {list(shape)} needs {num_elements}")
    kind = raw.dtype.kind if raw.size else ""
    if datatype == "BYTES":
        if kind not in ("", "U"):
            raise TensorError(f"input {name!r}: datatype BYTES takes strings, got {raw.dtype.name} values")
        return raw.astype(object).reshape(shape)
    if datatype == "BOOL":
        if kind not in ("", "b"):
            raise TensorError(f"input {name!r}: datatype BOOL takes true/false, got {raw.dtype.name} values")
        return raw.astype(np.bool_).reshape(shape)
    is_float = dtype.kind == "f"
    if kind not in ("", "i", "u") and not (is_float and kind == "f"):
        expected = "numbers" if is_float else "integers"
        raise TensorError(f"input {name!r}: datatype {datatype} takes {expected}, got {_kind_name(raw)} values")
    if is_float:
        return raw.astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise TensorError(f"input {name!r}: a value is outside {datatype}'s range [{info.min}, {info.max}]")
    return raw.astype(dtype).reshape(shape)


def _kind_name(raw: np.ndarray) -> str:
    return {"f": "fractional", "b": "boolean", "U": "string", "O": "mixed or very large"}.get(raw.dtype.kind, raw.dtype.name)


def encode_tensor(array: np.ndarray) -> list[Any]:
    """An output array -> flat JSON data (row-major); NaN/inf floats stay floats (json writes NaN/Infinity)."""
    flat = array.reshape(-1)
    if flat.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def concat_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
