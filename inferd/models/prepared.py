"""Layer 2: prepared weights, so a model that was loaded once reloads by mapping one file instead of rebuilding.

Loading a GGUF file (or quantizing a Hugging Face checkpoint at load) does real work after reading the bytes:
metadata parsing (the tokenizer arrays alone are ~100k strings), Q/K row un-permutation, repacking the blocks
into the kernels' tile layout. After the first load the finished state dict (packed quantized buffers, float
parameters) is written once to `<prepared_dir>/<key>.pt`; a later load of the same model with the same options
memory-maps that file (`torch.load(mmap=True)`: the tensors are pages of the file, nothing is copied) and only
builds the empty module tree around it.

The key covers everything that changes the prepared bytes: the source file(s) (path, size, mtime), quantization,
dtype, device, the kernel build (its name hashes the kernel sources, torch version and CPU flags, so a packed
layout is never read by other kernels) and FORMAT_VERSION. A file that fails to load is ignored and rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from typing import Any

import torch

from inferd.models.arch_config import ModelArchConfig, RopeScaling
from inferd.models.registry import create_model

FORMAT_VERSION = 1
_ARCH_CONFIG_KEY = "__inferd_arch_config__"
_PLAN_KEY = "__inferd_quant_plan__"


def _source_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path)
                      if n.endswith((".safetensors", ".json", ".bin", ".gguf")))
    return [path]


def prepared_key(path: str, device: str, dtype: torch.dtype, quantization: str) -> str:
    """A hex digest naming the prepared file of this model loaded with these options on this machine's kernels."""
    from inferd.kernels import kernel_build_name

    parts: list[str] = [str(FORMAT_VERSION), os.path.abspath(path), str(device), str(dtype), quantization,
                        torch.__version__, kernel_build_name()]
    for file in _source_files(path):
        stat = os.stat(file)
        parts += [os.path.basename(file), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _arch_config_to_json(arch_config: ModelArchConfig) -> str:
    return json.dumps(dataclasses.asdict(arch_config))


def _arch_config_from_json(text: str) -> ModelArchConfig:
    fields = json.loads(text)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    for name, value in fields.items():
        if isinstance(value, list):  # tuples went through JSON as lists
            fields[name] = tuple(value)
    return ModelArchConfig(**fields)


def quant_plan_of(model: torch.nn.Module) -> dict[str, str]:
    """Module path -> QuantLinear kind ("q4", "q8+a8", ...) as quantize_linears takes it."""
    from inferd.quant.linear import INT8_ACTIVATIONS_SUFFIX, QuantLinear

    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            path = "lm_head" if name == "quant_lm_head" else name
            plan[path] = module.kind + (INT8_ACTIVATIONS_SUFFIX if module.int8_activations else "")
    return plan


def save_prepared(file: str, model: torch.nn.Module, arch_config: ModelArchConfig) -> None:
    """Write the model's state dict and what rebuilds its module tree, atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(file), exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    state[_ARCH_CONFIG_KEY] = _arch_config_to_json(arch_config)  # type: ignore[assignment]
    state[_PLAN_KEY] = json.dumps(quant_plan_of(model))  # type: ignore[assignment]
    fd, tmp = tempfile.mkstemp(prefix=".prepared-", suffix=".tmp", dir=os.path.dirname(file))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_prepared(file: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, ModelArchConfig]:
    """The model from a prepared file: an empty module tree whose tensors become the file's mapped pages (CPU), or
    are copied to `device` once."""
    from inferd.quant.linear import QuantLinear

    state = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    arch_config = _arch_config_from_json(state.pop(_ARCH_CONFIG_KEY))
    plan = json.loads(state.pop(_PLAN_KEY))
    model = create_model(arch_config, "meta", dtype)
    model.quantize_linears(plan)
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in quant.items():
        for buffer in ("qs", "scales", "mins"):  # None until finalize(), so load_state_dict would not know them
            key = f"{name}.{buffer}"
            if key in state:
                setattr(module, buffer, torch.empty_like(state[key], device="meta"))
    if str(device) != "cpu":
        state = {name: t.to(device) for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if quant:
        from inferd.kernels import cpu_kernels_available, kernel_build_error

        if not cpu_kernels_available():  # the packed layout is the kernels'; nothing else reads it
            raise RuntimeError(f"prepared quantized weights need inferd's CPU kernels: {kernel_build_error()}")
    for module in quant.values():
        module._refresh_kernel_args()
    return model.eval(), arch_config


def load_or_prepare(
    prepared_dir: str, path: str, device: str, dtype: torch.dtype, quantization: str, build: Any
) -> tuple[torch.nn.Module, ModelArchConfig]:
    """load_prepared when this model's prepared file exists, else build() -> (model, arch_config) and save it.
    Saving is best effort: a full disk or a read-only directory only costs the next reload its speed."""
    file = os.path.join(prepared_dir, f"{prepared_key(path, device, dtype, quantization)}.pt")
    if os.path.exists(file):
        try:
            return load_prepared(file, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a torn or stale file is rebuilt from the source
            print(f"inferd: ignoring prepared weights {file} ({type(exc).__name__}: {exc})", file=sys.stderr)
    model, arch_config = build()
    try:
        save_prepared(file, model, arch_config)
    except Exception as exc:  # noqa: BLE001
        print(f"inferd: could not write prepared weights to {file} ({type(exc).__name__}: {exc})", file=sys.stderr)
    return model, arch_config
