"""Layer 2: load a GGUF file (llama.cpp's format): metadata -> ModelArchConfig, tensors dequantized to float32 and
renamed to Hugging Face names, then cast to the requested dtype by load_weights.

Two llama.cpp conventions are undone here:
- numpy shapes: GGUF lists dimensions innermost first ([in, out] for a Linear weight); GGUFReader hands out
  arrays already in numpy (row-major) order, i.e. [out, in] like torch, and quantized tensors as uint8 rows
  that gguf.quants.dequantize expands back to [out, in].
- Q/K row permutation: for the llama architecture llama.cpp's converter reorders the rows of q_proj and
  k_proj inside every head from the rotate-half layout of HF checkpoints ([first halves, second halves]) to the
  interleaved pairs its RoPE kernel uses. `unpermute_qk_rows` restores the HF order. qwen2 / qwen3 use
  rotate-half in llama.cpp too (NEOX rope) and are stored unpermuted.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from inferd.models.arch_config import SUPPORTED_ROPE_TYPES, ModelArchConfig, RopeScaling, gemma3_layer_windows
from inferd.models.registry import create_model
from inferd.quant import GGUF_KIND, BlockQuantized, plan_quantization, split_quantization
from inferd.quant.formats import GGUF_KIND_INT8_ACTIVATIONS
from inferd.quant.formats import from_gguf

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q6_K,
    # Dequantized to float at load (gguf.quants), then kept float or requantized per --quantization.
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q2_K,
)

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 (llama.cpp's names for its sandwich norms): ffn_norm is the norm before the MLP, not after attention.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
ROPE_FREQS_TENSOR = "rope_freqs.weight"


# ---- metadata -----------------------------------------------------------------------------------------------


def _field_value(field: Any) -> Any:
    """A GGUFReader field as a python value: str, int, float, bool, or a list of those."""
    main_type = field.types[0]
    if main_type == GGUFValueType.ARRAY:
        sub_type = field.types[-1]
        if sub_type == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if main_type == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]][0].item()
    return bool(value) if main_type == GGUFValueType.BOOL else value


def _metadata_of(reader: GGUFReader) -> dict[str, Any]:
    return {name: _field_value(field) for name, field in reader.fields.items()}


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """Every key-value pair of a GGUF file (general.*, {arch}.*, tokenizer.ggml.*, tokenizer.chat_template)
    decoded to python values; arrays become lists (tokenizer.ggml.tokens: list[str], token_type: list[int])."""
    return _metadata_of(GGUFReader(path))


def _gguf_arch(metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}")
    return arch


def _rope_scaling_from_gguf(metadata: dict[str, Any], arch: str) -> RopeScaling | None:
    rope_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if rope_type in ("none", ""):
        return None
    if rope_type == "linear":
        return RopeScaling("linear", float(metadata[f"{arch}.rope.scaling.factor"]))
    raise ValueError(
        f"GGUF rope scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        " (llama3 scaling arrives as the rope_freqs tensor)"
    )


def arch_config_from_gguf(
    metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], rope_freq_factors: tuple[float, ...] | None
) -> ModelArchConfig:
    """tensor_shapes: GGUF tensor name -> numpy-order shape (used for vocab size and which biases/norms exist)."""
    arch = _gguf_arch(metadata)
    hidden_size = int(metadata[f"{arch}.embedding_length"])
    num_heads = int(metadata[f"{arch}.attention.head_count"])
    num_kv_heads = metadata.get(f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        if len(set(num_kv_heads)) != 1:
            raise ValueError("GGUF models with a different number of kv heads per layer are not supported")
        num_kv_heads = num_kv_heads[0]
    # llama.cpp writes key_length only when config.json had head_dim; otherwise read it off the q projection.
    head_dim = int(metadata.get(f"{arch}.attention.key_length", tensor_shapes["blk.0.attn_q.weight"][0] // num_heads))
    eos_ids = [metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in metadata]
    gemma3: dict[str, Any] = {}
    if arch == "gemma3":  # what llama.cpp's gemma3 graph fixes rather than reads from the file
        num_layers = int(metadata[f"{arch}.block_count"])
        gemma3 = dict(
            layer_sliding_windows=gemma3_layer_windows(num_layers, int(metadata[f"{arch}.attention.sliding_window"])),
            hidden_act="gelu_tanh",
            attention_scale=float(metadata.get(f"{arch}.attention.scale", head_dim**-0.5)),
            embedding_scale=hidden_size**0.5,
            rope_local_theta=float(metadata.get(f"{arch}.rope.freq_base_swa", 10000.0)),
            norm_weight_offset=0.0,  # the converter already stored 1 + w
        )
    return ModelArchConfig(
        arch=arch,
        vocab_size=int(tensor_shapes["token_embd.weight"][0]),
        hidden_size=hidden_size,
        num_layers=int(metadata[f"{arch}.block_count"]),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        intermediate_size=int(metadata[f"{arch}.feed_forward_length"]),
        rms_norm_eps=float(metadata[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling_from_gguf(metadata, arch),
        max_position_embeddings=int(metadata.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        attention_out_bias="blk.0.attn_output.bias" in tensor_shapes,
        mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        rope_freq_factors=rope_freq_factors,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids)),
        **gemma3,
    )


# ---- tensors ------------------------------------------------------------------------------------------------


def hf_name_of(gguf_name: str, arch: str = "llama") -> str:
    """GGUF tensor name -> HF parameter name ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    m = _BLOCK_RE.match(gguf_name)
    if m is not None:
        layer_id, part, leaf = m.groups()
        block_names = _GEMMA3_BLOCK_NAMES if arch == "gemma3" else _BLOCK_NAMES
        if part in block_names:
            return f"model.layers.{layer_id}.{block_names[part]}.{leaf}"
    else:
        base, _, leaf = gguf_name.rpartition(".")
        if base in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[base]}.{leaf}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in the supported architectures")


def unpermute_qk_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute(): rows of each head go from interleaved pairs
    (row 2i = HF row i, row 2i+1 = HF row i + head_dim/2) back to HF's [first half; second half].
    weight [num_heads * head_dim, ...] (a weight or a bias)."""
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _dequantized(tensor: Any) -> np.ndarray:
    """float32 numpy array in numpy / torch order (GGUF dims reversed)."""
    if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
        raise ValueError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}; supported: {supported}")
    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _tensor_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def iter_gguf_tensors(
    reader: GGUFReader, arch_config: ModelArchConfig, keep_blocks: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor | BlockQuantized]]:
    """(HF name, float32 CPU tensor) for every weight tensor, with a progress bar on stderr. Tensors named in
    keep_blocks (HF names; the block types of formats.from_gguf) come as BlockQuantized, their exact blocks."""
    is_permuted = arch_config.arch == "llama"
    for tensor in tqdm(reader.tensors, desc="Loading GGUF tensors", unit="tensor", file=sys.stderr):
        if tensor.name == ROPE_FREQS_TENSOR:
            continue  # folded into arch_config.rope_freq_factors
        hf_name = hf_name_of(tensor.name, arch_config.arch)
        if hf_name in keep_blocks:
            shape = _tensor_shape(tensor)
            blocks = from_gguf(tensor.tensor_type.name, tensor.data, shape)
            if is_permuted and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
                num_heads = arch_config.num_heads if ".attn_q." in tensor.name else arch_config.num_kv_heads
                blocks = blocks.permute_rows(torch.from_numpy(unpermute_qk_rows(np.arange(shape[0]), num_heads)))
            yield hf_name, blocks
            continue
        values = _dequantized(tensor)
        if is_permuted and ".attn_q." in tensor.name:
            values = unpermute_qk_rows(values, arch_config.num_heads)
        elif is_permuted and ".attn_k." in tensor.name:
            values = unpermute_qk_rows(values, arch_config.num_kv_heads)
        # The reader's arrays are read-only views of a memory map; torch wants a writable, owned buffer.
        yield hf_name, torch.from_numpy(np.array(values, dtype=np.float32, copy=True))


def _read_arch_config(reader: GGUFReader) -> ModelArchConfig:
    metadata = _metadata_of(reader)
    tensor_shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    rope_freq_factors = None
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            rope_freq_factors = tuple(float(x) for x in _dequantized(tensor).reshape(-1))
    return arch_config_from_gguf(metadata, tensor_shapes, rope_freq_factors)


def read_gguf_arch_config(path: str) -> ModelArchConfig:
    return _read_arch_config(GGUFReader(path))


def load_gguf_model(
    path: str, device: torch.device | str, dtype: torch.dtype, quantization: str = "none"
) -> tuple[torch.nn.Module, ModelArchConfig]:
    """quantization: a resolved scheme of inferd.quant ("none", "gguf", "int8", "int4")."""
    reader = GGUFReader(path)
    arch_config = _read_arch_config(reader)
    model = create_model(arch_config, device, dtype)
    # The int8-activation kernels also take K-quants (Q4_K, Q5_K, Q6_K: float32 scales) and Q5_1; the float-activation
    # ones do not.
    kind_of = GGUF_KIND_INT8_ACTIVATIONS if split_quantization(quantization)[1] else GGUF_KIND
    source_kinds = {
        hf_name_of(t.name, arch_config.arch): kind_of.get(t.tensor_type.name)
        for t in reader.tensors if t.name != ROPE_FREQS_TENSOR
    }
    plan = plan_quantization(model.quantizable_linears(), quantization, source_kinds)
    model.quantize_linears(plan)
    keep_blocks = frozenset()
    if quantization.startswith("gguf"):  # gguf, gguf-int8act: the planned layers take the file's own blocks
        linears = model.quantizable_linears()
        keep_blocks = frozenset(name for path in plan for name in linears[path][1])
    model.load_weights(iter_gguf_tensors(reader, arch_config, keep_blocks))
    return model, arch_config
