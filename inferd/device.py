"""Layer 2: the ONLY place that asks "is CUDA here?" and turns dtype names into torch dtypes."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if is_cuda_available() else "cpu"
    if name == "cuda" and not is_cuda_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is visible to torch")
    return name


def resolve_dtype(name: str, device: str) -> str:
    """auto: float32 on CPU (bf16 matmuls are slow on most CPUs), bfloat16 on CUDA."""
    if name == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return name


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def free_device_memory_bytes(device: str) -> int:
    if device == "cuda":
        free_bytes, _total = torch.cuda.mem_get_info()
        return free_bytes
    raise ValueError("free_device_memory_bytes is only defined for cuda")
