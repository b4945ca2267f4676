"""Layer 2: the Llama family of decoder LLMs (Llama, Mistral, Qwen2, Qwen3) as one model class.

Differences are flags on ModelArchConfig: q/k/v bias (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3),
sliding-window layers (Mistral v0.1). q/k/v are one Linear and gate/up one Linear (fewer, larger matmuls: CPU
decode is overhead-bound); `load_weights` stacks the Hugging Face tensors into them. On CPU, when every projection
is an int8-activation QuantLinear (the default for a GGUF file), forward runs all layers as one kernel call
(torch.ops.inferd.decoder_layers, kernels/csrc/cpu_decoder.cpp) with the same bits as the layer-by-layer code below:
the ~20 torch ops per layer cost ~2 ms of Python and dispatch in a ~7 ms single-stream decode step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from inferd.kernels import DEFAULT_KERNEL_BACKEND, KernelBackend
from inferd.layers.attention import AttentionMetadata, paged_attention, token_rows
from inferd.layers.norm import RMSNorm
from inferd.layers.rotary import RotaryEmbedding, apply_rotary
from inferd.models.arch_config import ModelArchConfig
from inferd.quant import BlockQuantized, QuantLinear

# HF checkpoint tensors we have no use for.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Attention(nn.Module):
    kernel_backend: KernelBackend = DEFAULT_KERNEL_BACKEND  # the model's own, set at load (apply_kernel_backend)

    def __init__(self, cfg: ModelArchConfig, layer_id: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window_of(layer_id)
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        md: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        num_tokens = x.shape[0]
        h, hkv = self.num_heads, self.num_kv_heads
        qkv_rows = self.qkv_proj(x)  # [T, (h + 2 hkv) * D], a fresh tensor
        qkv = qkv_rows.view(num_tokens, h + 2 * hkv, self.head_dim)
        if self.q_norm is None and self.kernel_backend.use_cpu_ops(qkv_rows):
            torch.ops.inferd.rotary_inplace(qkv_rows, cos, signed_sin, h + hkv, self.head_dim)
            q, k = qkv[:, :h], qkv[:, h : h + hkv]
        elif self.q_norm is not None:
            q = apply_rotary(self.q_norm(qkv[:, :h]), cos, signed_sin)
            k = apply_rotary(self.k_norm(qkv[:, h : h + hkv]), cos, signed_sin)
        else:
            qk = apply_rotary(qkv[:, : h + hkv], cos, signed_sin)  # q and k heads rotated in one pass
            q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, h + hkv :]
        out = paged_attention(q, k, v, kv_cache, md, self.scale, self.sliding_window, self.kernel_backend)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, h * self.head_dim))


class MLP(nn.Module):
    kernel_backend: KernelBackend = DEFAULT_KERNEL_BACKEND

    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernel_backend.use_cpu_ops(gate_up):
            return self.down_proj(torch.ops.inferd.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        md: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, residual stream before it); the next norm adds the two."""
        x, residual = self.input_layernorm.forward_with_residual(hidden, residual)
        x = self.self_attn(x, cos, signed_sin, md, kv_cache)
        x, residual = self.post_attention_layernorm.forward_with_residual(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        # An explicit (uninitialised) weight skips nn.Embedding's random init: on the meta device (create_model) its
        # first call imports torch._dynamo, ~2.5 s of a fresh process's start (a new Ray replica, scale from zero).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """model.forward(input_ids [T], positions [T], attn_metadata, kv_caches) -> hidden [T, hidden];
    model.compute_logits(hidden [B, hidden]) -> logits [B, vocab] float32."""

    kernel_backend: KernelBackend = DEFAULT_KERNEL_BACKEND

    def __init__(self, arch_config: ModelArchConfig) -> None:
        super().__init__()
        self.arch_config = arch_config
        self.model = DecoderModel(arch_config)
        self.lm_head = (
            None
            if arch_config.tie_word_embeddings
            else nn.Linear(arch_config.hidden_size, arch_config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(arch_config)
        # Set by quantize_linears when the output projection is block-quantized (the embedding itself stays
        # float: a lookup reads one row per token).
        self.quant_lm_head: QuantLinear | None = None
        # Run all decoder layers as one kernel call (torch.ops.inferd.decoder_layers) when the model allows it
        # (see _fused_layer_args); False: layer by layer, e.g. to compare the two in tests.
        self.fused_layers_enabled = True
        self._fused_args: tuple[list[torch.Tensor], list[int]] | None | bool = False  # False: not looked at yet

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """`num_layers`: run only the first this-many decoder layers (one KV tensor each), then the final norm: the
        early exit a self-draft proposes with (models/early_exit.py). None: all layers."""
        hidden = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, signed_sin = self.rotary.cos_sin(positions, hidden.dtype)
        if self.fused_layers_enabled and self.kernel_backend.use_cpu_ops(hidden):
            fused = self._fused_args if self._fused_args is not False else self._build_fused_layer_args()
            if fused is not None and kv_caches[0].is_contiguous():
                return self._fused_forward(hidden, cos, signed_sin, attn_metadata, kv_caches, num_layers, *fused)
        residual = None
        layers = self.model.layers if num_layers is None else self.model.layers[:num_layers]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos, signed_sin, attn_metadata, kv_cache)
        hidden, _ = self.model.norm.forward_with_residual(hidden, residual)
        return hidden

    def _fused_forward(self, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                       md: AttentionMetadata, kv_caches: list[torch.Tensor], num_layers: int | None,
                       layer_tensors: list[torch.Tensor], layer_ints: list[int]) -> torch.Tensor:
        """forward's layers and final norm as one kernel call: the same bits as the layer-by-layer path."""
        cfg = self.arch_config
        num_layers = cfg.num_layers if num_layers is None else num_layers
        if len(kv_caches) != num_layers:
            raise ValueError(f"{len(kv_caches)} KV caches for {num_layers} layers")
        block_tables, seq_lens = token_rows(md)
        attn = self.model.layers[0].self_attn
        return torch.ops.inferd.decoder_layers(
            hidden, layer_tensors, layer_ints, kv_caches, cos, signed_sin, md.slot_mapping, block_tables, seq_lens,
            self.model.norm.weight, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            self.model.norm.eps, attn.scale)

    def _build_fused_layer_args(self) -> tuple[list[torch.Tensor], list[int]] | None:
        """(tensors, ints) per layer as decoder_layers takes them, or None when a layer does not fit the fused
        kernel: every projection an int8-activation QuantLinear, plain Llama layers (no q/k norm, SiLU MLP), one
        eps and one attention scale. Cached until the weights change (_apply, load_weights, load_state_dict)."""
        none = torch.empty(0)
        formats = {"q4": 0, "q8": 1, "q6": 2, "q5": 3}
        tensors: list[torch.Tensor] = []
        ints: list[int] = []
        eps, scale = self.model.norm.eps, self.model.layers[0].self_attn.scale
        fits = True
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if (type(layer) is not DecoderLayer or type(attn) is not Attention or type(mlp) is not MLP
                    or attn.q_norm is not None or attn.scale != scale
                    or layer.input_layernorm.eps != eps or layer.post_attention_layernorm.eps != eps
                    or not all(isinstance(p, QuantLinear) and p.int8_activations and p.qs is not None
                               for p in projections)):
                fits = False
                break
            tensors += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
            for p in projections:
                qs, scales, *mins = p._kernel_args
                bias = p.bias.detach() if p.bias is not None else none
                tensors += [qs, scales, mins[0] if mins else none, bias]
            ints += [formats[p.kind] for p in projections] + [attn.sliding_window or 0]
        self._fused_args = (tensors, ints) if fits else None
        return self._fused_args

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: the cached tensors would be the old ones
        self._fused_args = False
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args, **kwargs):
        self._fused_args = False
        return super().load_state_dict(*args, **kwargs)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant_lm_head is not None:
            return self.quant_lm_head(hidden).float()
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ---- weights -----------------------------------------------------------------------------------------

    @property
    def _head_source(self) -> str:
        """The checkpoint tensor the output projection is made of."""
        return "model.embed_tokens.weight" if self.arch_config.tie_word_embeddings else "lm_head.weight"

    def quantizable_linears(self) -> dict[str, tuple[tuple[int, int], list[str]]]:
        """Module path -> ([out_features, in_features], checkpoint tensors that fill it); "lm_head" is the output
        projection, tied or not."""
        cfg = self.arch_config
        linears: dict[str, tuple[tuple[int, int], list[str]]] = {}
        for i in range(cfg.num_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            linears[f"{attn}.qkv_proj"] = (
                (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size), [f"{attn}.{n}_proj.weight" for n in "qkv"])
            linears[f"{attn}.o_proj"] = ((cfg.hidden_size, cfg.q_size), [f"{attn}.o_proj.weight"])
            linears[f"{mlp}.gate_up_proj"] = (
                (2 * cfg.intermediate_size, cfg.hidden_size), [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"])
            linears[f"{mlp}.down_proj"] = ((cfg.hidden_size, cfg.intermediate_size), [f"{mlp}.down_proj.weight"])
        linears["lm_head"] = ((cfg.vocab_size, cfg.hidden_size), [self._head_source])
        return linears

    def quantize_linears(self, plan: dict[str, str]) -> None:
        """Swap the planned linear layers (path -> "q4" | "q8", see inferd.quant.plan_quantization) for
        QuantLinear, before load_weights fills them."""
        cfg = self.arch_config
        self._fused_args = False
        for path, kind in plan.items():
            if path == "lm_head":
                self.quant_lm_head = QuantLinear(cfg.hidden_size, cfg.vocab_size, kind, bias=False)
                self.lm_head = None
                continue
            parent_path, _, attr = path.rpartition(".")
            parent = self.get_submodule(parent_path)
            old = getattr(parent, attr)
            if not isinstance(old, nn.Linear):
                raise ValueError(f"{path} is not a Linear layer")
            setattr(parent, attr, QuantLinear(old.in_features, old.out_features, kind, bias=old.bias is not None))

    def _stacked_shards(self) -> dict[str, tuple[str, int, int]]:
        """HF projection name -> (our stacked projection, row offset, row count)."""
        cfg = self.arch_config
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        return {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, inter),
        }

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | BlockQuantized]]) -> None:
        """Copy HF-named tensors into the parameters (casting to the parameter's dtype and device) and into the
        QuantLinear layers (which quantize float tensors, or take BlockQuantized ones as they are); a
        BlockQuantized tensor bound for a float parameter is dequantized. Raises if a tensor has no home, a
        shape differs, or a row is left unloaded."""
        params = dict(self.named_parameters())
        quant = {name: m for name, m in self.named_modules() if isinstance(m, QuantLinear)}
        stacked = self._stacked_shards()
        # Rows still to be written, per parameter: a stacked parameter is complete once all its shards arrive.
        rows_missing = {name: p.shape[0] if p.dim() > 0 else 1 for name, p in params.items()}
        rows_missing.update({f"{name}.weight": m.out_features for name, m in quant.items()})
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_name == self._head_source and self.quant_lm_head is not None:
                self.quant_lm_head.load_rows(0, tensor)
                rows_missing["quant_lm_head.weight"] -= self.arch_config.vocab_size
                if hf_name == "lm_head.weight":
                    continue  # otherwise (tied) the embedding is loaded from it below as well
            if hf_name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the output projection is the embedding
            prefix, _, leaf = hf_name.rpartition(".")  # leaf: "weight" | "bias"
            parent, _, proj = prefix.rpartition(".")
            target_module = f"{parent}.{stacked[proj][0]}" if proj in stacked else prefix
            if leaf == "weight" and target_module in quant:
                row_offset = stacked[proj][1] if proj in stacked else 0
                quant[target_module].load_rows(row_offset, tensor)
                rows_missing[f"{target_module}.weight"] -= tensor.shape[0]
                continue
            if isinstance(tensor, BlockQuantized):
                tensor = tensor.dequantize()
            if proj in stacked:
                target, row_offset, num_rows = stacked[proj]
                name = f"{parent}.{target}.{leaf}"
                param = params.get(name)
                if param is None:
                    raise ValueError(f"checkpoint tensor {hf_name} has no matching parameter {name}")
                dest = param.narrow(0, row_offset, num_rows)
            else:
                name = hf_name
                param = params.get(name)
                if param is None:
                    raise ValueError(f"checkpoint tensor {hf_name} has no matching parameter in {type(self).__name__}")
                dest = param
                num_rows = param.shape[0] if param.dim() > 0 else 1
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            rows_missing[name] -= num_rows
        incomplete = sorted(name for name, n in rows_missing.items() if n != 0)
        if incomplete:
            shown = ", ".join(incomplete[:8]) + (" ..." if len(incomplete) > 8 else "")
            raise ValueError(f"{len(incomplete)} parameters were not (fully) loaded: {shown}")
        for module in quant.values():
            module.finalize()
        self._fused_args = False
