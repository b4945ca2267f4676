"""Layer 2: the shape of a decoder LLM, read once from a Hugging Face config.json or from GGUF metadata.

`ModelArchConfig` is the only thing a model class, the KV-cache sizing and the runner need to know about an
architecture; nothing downstream looks at config.json again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# HF `architectures[0]` and `model_type` names -> our arch name.
_HF_ARCH_NAMES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `linear`: every inverse frequency divided by `factor` (position interpolation).
    `llama3`: Llama 3.1's piecewise scaling: wavelengths above original_max_position_embeddings / low_freq_factor
    are divided by `factor`, below original_max_position_embeddings / high_freq_factor kept, smoothly blended
    in between."""

    rope_type: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArchConfig:
    arch: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (Llama with attention_bias=True only)
    mlp_bias: bool = False  # bias on gate/up/down (Llama with mlp_bias=True)
    qk_norm: bool = False  # RMSNorm over head_dim of q and k before RoPE (Qwen3)
    # Per layer: attend to the last N positions only (Mistral v0.1, Qwen with use_sliding_window), else None.
    layer_sliding_windows: tuple[int | None, ...] = ()
    # llama.cpp's `rope_freqs.weight`: per-frequency divisors of the inverse frequencies [head_dim / 2]
    # (how GGUF files of Llama 3.1+ carry llama3 rope scaling).
    rope_freq_factors: tuple[float, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3's differences (defaults are the Llama family's):
    hidden_act: str = "silu"  # "silu" | "gelu_tanh" (the MLP's gate activation)
    attention_scale: float | None = None  # softmax scale of q.k; None: head_dim ** -0.5
    embedding_scale: float | None = None  # token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers (Gemma 3: 10,000), unscaled
    # Added to every RMSNorm weight at load: Hugging Face Gemma checkpoints store w for x * (1 + w); llama.cpp's
    # converter already added the 1, so GGUF files need 0.
    norm_weight_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.layer_sliding_windows and len(self.layer_sliding_windows) != self.num_layers:
            raise ValueError("layer_sliding_windows must have one entry per layer")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def sliding_window_of(self, layer_id: int) -> int | None:
        return self.layer_sliding_windows[layer_id] if self.layer_sliding_windows else None


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys."""
    params = cfg.get("rope_parameters") or {}
    if params and not isinstance(params.get("rope_type", params.get("type", "default")), str):
        raise ValueError("per-layer-type rope_parameters are not supported")
    rope_theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return rope_theta, None
    if rope_type == "linear":
        return rope_theta, RopeScaling("linear", float(scaling["factor"]))
    return rope_theta, RopeScaling(
        "llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _hf_arch_name(cfg: dict[str, Any]) -> str:
    for name in cfg.get("architectures") or []:
        if name in _HF_ARCH_NAMES:
            return _HF_ARCH_NAMES[name]
    model_type = cfg.get("model_type")
    if model_type in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[model_type]
    raise ValueError(
        f"unsupported model: architectures={cfg.get('architectures')} model_type={model_type!r}; "
        f"supported architectures: {', '.join(sorted(_HF_ARCH_NAMES))}"
    )


def _hf_sliding_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3"):
        # Qwen configs carry a sliding_window value that only counts when use_sliding_window is set.
        if not cfg.get("use_sliding_window", False):
            return ()
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            max_window_layers = int(cfg.get("max_window_layers", num_layers))
            layer_types = [
                "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)
            ]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if window is None:
        return ()
    return tuple(int(window) for _ in range(num_layers))


def gemma3_layer_windows(num_layers: int, window: int, layer_types: list[str] | None = None,
                         pattern: int = 6) -> tuple[int | None, ...]:
    """Gemma 3's interleaving: every `pattern`-th layer attends globally, the others to the last `window`."""
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _gemma3_from_hf(cfg: dict[str, Any]) -> ModelArchConfig:
    if cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")) != "gelu_pytorch_tanh":
        raise ValueError(f"gemma3 hidden_activation {cfg.get('hidden_activation')!r} is not supported")
    if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
        raise ValueError("gemma3 logit soft-capping is not supported")
    hidden_size = int(cfg["hidden_size"])
    num_layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or hidden_size // int(cfg["num_attention_heads"]))
    params = cfg.get("rope_parameters") or {}
    global_params = params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params
    local_params = params.get("sliding_attention") if isinstance(params.get("sliding_attention"), dict) else {}
    rope_theta, rope_scaling = _rope_from_hf({"rope_parameters": global_params} if global_params else cfg)
    local_theta = float(local_params.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
    return ModelArchConfig(
        arch="gemma3",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        head_dim=head_dim,
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        attention_out_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=True,
        layer_sliding_windows=gemma3_layer_windows(num_layers, int(cfg.get("sliding_window") or 512),
                                                   cfg.get("layer_types")),  # fmt: skip
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
        hidden_act="gelu_tanh",
        attention_scale=float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        embedding_scale=hidden_size**0.5,
        rope_local_theta=local_theta,
        norm_weight_offset=1.0,
    )


def arch_config_from_hf(cfg: dict[str, Any]) -> ModelArchConfig:
    """ModelArchConfig from a parsed Hugging Face config.json."""
    arch = _hf_arch_name(cfg)
    if arch == "gemma3":
        return _gemma3_from_hf(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported; supported: silu")
    hidden_size = int(cfg["hidden_size"])
    num_heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    head_dim = cfg.get("head_dim") or hidden_size // num_heads
    rope_theta, rope_scaling = _rope_from_hf(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    if arch == "qwen2":
        qkv_bias, out_bias = True, False
    elif arch == "mistral":
        qkv_bias, out_bias = False, False
    else:  # llama, qwen3: one flag for q/k/v/o
        qkv_bias, out_bias = attention_bias, attention_bias
    return ModelArchConfig(
        arch=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=arch == "qwen3",
        layer_sliding_windows=_hf_sliding_windows(cfg, arch, num_layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
    )
