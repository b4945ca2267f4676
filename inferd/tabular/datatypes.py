"""OIP v2 tensor datatypes and their numpy, Triton-config and ONNX spellings.

    OIP (wire)   Triton config.pbtxt   numpy      ONNX TensorProto elem type
    BOOL         TYPE_BOOL             bool_      9
    UINT8..64    TYPE_UINT8..64        uint8..64  2, 4, 12, 13
    INT8..64     TYPE_INT8..64         int8..64   3, 5, 6, 7
    FP16/32/64   TYPE_FP16/32/64       float16..  10, 1, 11
    BYTES        TYPE_STRING           object     8 (string)

BF16 has no numpy dtype and is not served.
"""

from __future__ import annotations

import numpy as np

# OIP datatype -> numpy dtype (BYTES tensors hold Python str/bytes objects).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
OIP_DATATYPES = tuple(NUMPY_DTYPES)

_TRITON_TO_OIP = {f"TYPE_{name}": name for name in OIP_DATATYPES if name != "BYTES"} | {"TYPE_STRING": "BYTES"}
_OIP_TO_TRITON = {oip: triton for triton, oip in _TRITON_TO_OIP.items()}

# onnxruntime's NodeArg.type strings ("tensor(float)") -> OIP datatype.
_ORT_TYPE_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def triton_to_oip(type_name: str) -> str:
    """'TYPE_FP32' -> 'FP32'; ValueError for a type we do not serve."""
    try:
        return _TRITON_TO_OIP[type_name]
    except KeyError:
        raise ValueError(f"data_type {type_name!r} is not supported; use one of {sorted(_TRITON_TO_OIP)}") from None


def oip_to_triton(datatype: str) -> str:
    return _OIP_TO_TRITON[datatype]


def ort_type_to_oip(ort_type: str) -> str:
    try:
        return _ORT_TYPE_TO_OIP[ort_type]
    except KeyError:
        raise ValueError(f"ONNX tensor type {ort_type!r} is not supported; use one of {sorted(_ORT_TYPE_TO_OIP)}") from None


_DATATYPE_BY_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPES.items()}


def oip_datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array (object/str/bytes arrays are BYTES)."""
    name = _DATATYPE_BY_DTYPE.get(array.dtype)
    if name is not None:
        return name
    if array.dtype.kind in "OSU":
        return "BYTES"
    raise ValueError(f"numpy dtype {array.dtype} has no OIP datatype")
