"""Layer 2: Gemma 3 (text), a Llama-family decoder with Gemma's differences, built from the Llama parts.

What differs from LlamaForCausalLM (all read from ModelArchConfig):
- token embeddings are multiplied by sqrt(hidden_size) (`embedding_scale`);
- "sandwich" norms: each layer normalises its attention and MLP outputs before adding them to the residual
  stream (post_attention_layernorm, post_feedforward_layernorm) besides the usual pre-norms;
- the MLP gate is GELU (tanh approximation), not SiLU;
- five of every six layers attend to the last `sliding_window` positions with RoPE base `rope_local_theta`
  (10,000); every sixth attends globally with base `rope_theta` (1,000,000) and its scaling;
- q and k are RMS-normalised per head before RoPE (as Qwen3), and q.k is scaled by query_pre_attn_scalar^-0.5;
- RMSNorm computes x * (1 + w) in Hugging Face checkpoints: the 1 is added to the weights at load
  (`norm_weight_offset`), so the norm itself is Llama's x * w.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers.attention import AttentionMetadata
from inferd.layers.norm import RMSNorm
from inferd.layers.rotary import RotaryEmbedding
from inferd.models.arch_config import ModelArchConfig
from inferd.models.llama import MLP, Attention, LlamaForCausalLM
from inferd.quant import BlockQuantized


class GeluTanhMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_id: int) -> None:
        super().__init__()
        self.is_sliding = cfg.sliding_window_of(layer_id) is not None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GeluTanhMLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, md: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] (the residual stream) -> the stream after this layer."""
        x = self.self_attn(self.input_layernorm(hidden), cos, signed_sin, md, kv_cache)
        x, hidden = self.pre_feedforward_layernorm.forward_with_residual(self.post_attention_layernorm(x), hidden)
        return hidden + self.post_feedforward_layernorm(self.mlp(x))


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Same interface as LlamaForCausalLM: forward(input_ids [T], positions [T], attn_metadata, kv_caches) ->
    hidden [T, hidden]; compute_logits(hidden [B, hidden]) -> logits [B, vocab] float32."""

    def __init__(self, arch_config: ModelArchConfig) -> None:
        super().__init__(arch_config)
        self.model.layers = nn.ModuleList(Gemma3DecoderLayer(arch_config, i) for i in range(arch_config.num_layers))
        local = dataclasses.replace(arch_config, rope_theta=arch_config.rope_local_theta or arch_config.rope_theta,
                                    rope_scaling=None, rope_freq_factors=None)  # fmt: skip
        self.local_rotary = RotaryEmbedding(local)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_caches: list[torch.Tensor], num_layers: int | None = None) -> torch.Tensor:
        """`num_layers`: only the first this-many layers, then the final norm (a self-draft's early exit)."""
        hidden = self.model.embed_tokens(input_ids)  # [T, hidden]
        if self.arch_config.embedding_scale is not None:
            # In the activations' dtype, as transformers rounds it.
            hidden = hidden * torch.tensor(self.arch_config.embedding_scale, dtype=hidden.dtype)
        global_rope = self.rotary.cos_sin(positions, hidden.dtype)
        local_rope = self.local_rotary.cos_sin(positions, hidden.dtype)
        layers = self.model.layers if num_layers is None else self.model.layers[:num_layers]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            cos, signed_sin = local_rope if layer.is_sliding else global_rope
            hidden = layer(hidden, cos, signed_sin, attn_metadata, kv_cache)
        return self.model.norm(hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | BlockQuantized]]) -> None:
        offset = self.arch_config.norm_weight_offset

        def with_norm_offset() -> Iterator[tuple[str, torch.Tensor | BlockQuantized]]:
            for name, tensor in weights:
                if offset and name.endswith("norm.weight") and isinstance(tensor, torch.Tensor):
                    tensor = tensor.float() + offset
                yield name, tensor

        super().load_weights(with_norm_offset())
