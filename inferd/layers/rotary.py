"""Layer 2: rotary position embedding in the rotate-half layout Hugging Face checkpoints use.

cos/sin are computed once per step from the positions (never from a table sized by max_position_embeddings,
which is 128K rows for Llama 3) and shared by every layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # layers never import models at run time (models import layers)
    from inferd.models.arch_config import ModelArchConfig


def compute_inv_freq(arch_config: ModelArchConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] float32, scaling applied. Computed in float32 with the same operation
    order as transformers so the angles match bit for bit."""
    dim = arch_config.head_dim
    # Explicit CPU device: models are built under `with torch.device("meta")`.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (arch_config.rope_theta**exponents)
    if arch_config.rope_freq_factors is not None:
        factors = torch.tensor(arch_config.rope_freq_factors, dtype=torch.float32, device="cpu")
        return inv_freq / factors
    scaling = arch_config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_context_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_context_len / scaling.low_freq_factor
        high_freq_wavelen = old_context_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        # Between the two wavelengths blend linearly in (context / wavelength).
        smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)
    raise ValueError(f"rope type {scaling.rope_type!r} is not supported; supported: linear, llama3")


class RotaryEmbedding:
    """Holds the inverse frequencies; not an nn.Module so that moving or casting the model never rounds them."""

    def __init__(self, arch_config: ModelArchConfig) -> None:
        self.head_dim = arch_config.head_dim
        self._inv_freq_cpu = compute_inv_freq(arch_config)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        inv_freq = self._inv_freq_by_device.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_cpu.to(device)
            self._inv_freq_by_device[device] = inv_freq
        return inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos [T, 1, head_dim], signed_sin [T, 1, head_dim]) in `dtype`.
        signed_sin = cat(-sin, sin) so that rotate_half(x) * sin == roll(x, head_dim / 2) * signed_sin."""
        freqs = positions.to(torch.float32)[:, None] * self._inv_freq_on(positions.device)[None, :]  # [T, D/2]
        cos_half = freqs.cos()
        sin_half = freqs.sin()
        cos = torch.cat((cos_half, cos_half), dim=-1).to(dtype)
        signed_sin = torch.cat((-sin_half, sin_half), dim=-1).to(dtype)
        return cos.unsqueeze(1), signed_sin.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, num_heads, head_dim] (any strides) -> rotated copy, contiguous.
    Equals x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1)."""
    rolled = torch.roll(x, shifts=x.shape[-1] // 2, dims=-1)  # cat(x2, x1)
    return torch.addcmul(x * cos, rolled, signed_sin)
