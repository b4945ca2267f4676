"""Layer 2: decoder LLM classes, their registry, and the weight loaders (Hugging Face directory, GGUF file)."""

from __future__ import annotations

import os

import torch

from inferd.kernels import KernelBackend, apply_kernel_backend, resolve_kernel_backend
from inferd.models.arch_config import ModelArchConfig, RopeScaling
from inferd.models.registry import create_model, get_model_class, supported_architectures

__all__ = [
    "ModelArchConfig",
    "RopeScaling",
    "create_model",
    "get_model_class",
    "is_gguf_file",
    "load_model",
    "read_model_arch_config",
    "supported_architectures",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def is_gguf_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def read_model_arch_config(path: str) -> ModelArchConfig:
    """The architecture of a model (HF directory or .gguf file) without loading its weights."""
    from inferd.models.gguf_loader import read_gguf_arch_config
    from inferd.models.hf_loader import is_hf_model_dir, read_hf_arch_config

    if is_gguf_file(path):
        return read_gguf_arch_config(path)
    if is_hf_model_dir(path):
        return read_hf_arch_config(path)
    raise ValueError(f"{path!r} is neither a .gguf file nor a Hugging Face model directory with config.json")


def load_model(
    path: str | os.PathLike, device: torch.device | str, dtype: torch.dtype | str, quantization: str = "none",
    prepared_dir: str | None = None, kernel_backend: "str | KernelBackend | None" = None,
) -> tuple[torch.nn.Module, ModelArchConfig]:
    """(model in eval mode on `device` in `dtype`, its arch config) from a HF directory (config.json +
    *.safetensors) or a .gguf file. quantization: a resolved scheme of inferd.quant (none: GGUF blocks are
    dequantized; gguf: they are kept; int8 / int4: float weights are quantized as they load).
    prepared_dir: keep the finished weights there after the first load and map them on later loads
    (models/prepared.py; CPU only).
    kernel_backend: the code this model's layers run (inferd.kernels.KERNEL_BACKENDS; None or "auto": cpu-fused),
    set on its modules here, so two models in one process can run different backends."""
    backend = resolve_kernel_backend(kernel_backend)
    model, arch_config = _load_model(os.fspath(path), device, dtype, quantization, prepared_dir)
    apply_kernel_backend(model, backend)
    return model, arch_config


def _load_model(
    path: str, device: torch.device | str, dtype: torch.dtype | str, quantization: str, prepared_dir: str | None,
) -> tuple[torch.nn.Module, ModelArchConfig]:
    if prepared_dir is not None and str(device) == "cpu":
        from inferd.models.prepared import load_or_prepare

        return load_or_prepare(prepared_dir, path, str(device), _as_dtype(dtype), quantization,
                               lambda: _load_model(path, device, dtype, quantization, None))
    from inferd.models.gguf_loader import load_gguf_model
    from inferd.models.hf_loader import is_hf_model_dir, load_hf_model

    torch_dtype = _as_dtype(dtype)
    if is_gguf_file(path):
        return load_gguf_model(path, device, torch_dtype, quantization)
    if is_hf_model_dir(path):
        if quantization.startswith("gguf"):
            raise ValueError("quantization 'gguf' needs a .gguf model file; use int8 or int4 for other checkpoints")
        return load_hf_model(path, device, torch_dtype, quantization)
    raise ValueError(f"{path!r} is neither a .gguf file nor a Hugging Face model directory with config.json")
