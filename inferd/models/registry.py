"""Layer 2: architecture name -> model class.

Accepts our arch names (llama, mistral, qwen2, qwen3, gemma3), Hugging Face `architectures` names (LlamaForCausalLM...)
and GGUF `general.architecture` values (llama, qwen2, qwen3, gemma3).
"""

from __future__ import annotations

import torch
from torch import nn

from inferd.models.arch_config import ModelArchConfig
from inferd.models.gemma3 import Gemma3ForCausalLM
from inferd.models.llama import LlamaForCausalLM

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}
_ALIASES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}


def supported_architectures() -> list[str]:
    return sorted(_MODEL_CLASSES) + sorted(_ALIASES)


def get_model_class(arch: str) -> type[nn.Module]:
    key = _ALIASES.get(arch, arch.lower())
    if key not in _MODEL_CLASSES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(supported_architectures())}")
    return _MODEL_CLASSES[key]


def create_model(arch_config: ModelArchConfig, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """An uninitialised model on `device` in `dtype` (built on the meta device: no random init, no copies);
    every parameter must then be filled by model.load_weights."""
    with torch.device("meta"):
        model = get_model_class(arch_config.arch)(arch_config)
    return model.to_empty(device=device).to(dtype).eval()
