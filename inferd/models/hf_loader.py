"""Layer 2: load a Hugging Face model directory (config.json + *.safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import replace

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from inferd.models.arch_config import ModelArchConfig, arch_config_from_hf
from inferd.models.registry import create_model
from inferd.quant import plan_quantization

SAFETENSORS_INDEX = "model.safetensors.index.json"


def is_hf_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_hf_arch_config(model_dir: str) -> ModelArchConfig:
    """ModelArchConfig from config.json, with generation_config.json's eos ids (chat models often list their
    end-of-turn token only there) added to the config's."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    arch_config = arch_config_from_hf(cfg)
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen_eos = json.load(f).get("eos_token_id")
        gen_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        extra = tuple(int(i) for i in gen_ids if int(i) not in arch_config.eos_token_ids)
        if extra:
            arch_config = replace(arch_config, eos_token_ids=arch_config.eos_token_ids + extra)
    return arch_config


def safetensors_files(model_dir: str) -> list[str]:
    index_path = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir} (other weight formats are not supported)")
    return [os.path.join(model_dir, n) for n in names]


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF tensor name, CPU tensor) for every tensor of every shard, with a progress bar on stderr."""
    files = safetensors_files(model_dir)
    num_tensors = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            num_tensors += len(f.keys())
    with tqdm(total=num_tensors, desc="Loading safetensors", unit="tensor", file=sys.stderr) as bar:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)


def load_hf_model(
    model_dir: str, device: torch.device | str, dtype: torch.dtype, quantization: str = "none"
) -> tuple[torch.nn.Module, ModelArchConfig]:
    """quantization: a resolved scheme of inferd.quant ("none", "int8", "int4": float weights quantized as
    they load)."""
    arch_config = read_hf_arch_config(model_dir)
    model = create_model(arch_config, device, dtype)
    model.quantize_linears(plan_quantization(model.quantizable_linears(), quantization))
    model.load_weights(iter_safetensors(model_dir))
    return model, arch_config
