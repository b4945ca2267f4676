"""Layer 2: a self-draft: the first k decoder layers of a model, its final norm and its output projection.

LayerSkip-style self-speculation without a second checkpoint: the draft is a view over the target's own modules
(no weight is copied; quantized layers stay the target's), with its own KV cache of k layers. `arch_config` is
the target's with num_layers = k, so KV sizing and allocation treat it like any k-layer model. How well it
guesses depends on the model: one trained for early exit (LayerSkip checkpoints) accepts far more proposals than
one that was not.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

SELF_DRAFT_PREFIX = "self:"


def parse_self_draft(speculative_model: str | None) -> int | None:
    """'self:8' -> 8 (layers); None for any other value (a draft checkpoint's path or name)."""
    if speculative_model is None or not speculative_model.startswith(SELF_DRAFT_PREFIX):
        return None
    value = speculative_model[len(SELF_DRAFT_PREFIX):]
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"speculative_model: 'self:K' needs a number of layers K >= 1, got {speculative_model!r}")
    return int(value)


class EarlyExitModel:
    """Callable like the target: (input_ids [T], positions [T], attn_metadata, kv_caches [k]) -> hidden [T, hidden];
    compute_logits(hidden [B, hidden]) -> float32 logits [B, V]. Not an nn.Module, so the target's parameters are
    not registered (or counted, or moved) twice."""

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        num_target_layers = target.arch_config.num_layers
        if not (1 <= num_layers < num_target_layers):
            raise ValueError(
                f"speculative_model: a self-draft takes 1 to {num_target_layers - 1} of the target's "
                f"{num_target_layers} layers, got {num_layers}")
        self.target = target
        self.num_layers = num_layers
        self.arch_config = dataclasses.replace(
            target.arch_config, num_layers=num_layers,
            layer_sliding_windows=target.arch_config.layer_sliding_windows[:num_layers])
        self.dtype: torch.dtype = next(target.parameters()).dtype
        # The target's layers run, so its kernel backend (the runner gives it to the draft's sampler).
        self.kernel_backend = getattr(target, "kernel_backend", None)

    def __call__(self, input_ids, positions, attn_metadata, kv_caches) -> torch.Tensor:
        return self.target(input_ids, positions, attn_metadata, kv_caches, num_layers=self.num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)
