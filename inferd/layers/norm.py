"""Layer 2: RMSNorm, optionally fused with the residual add that precedes it (one fused CPU op for float32 on
CPU, inferd/kernels; the torch code otherwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.kernels import DEFAULT_KERNEL_BACKEND, KernelBackend


class RMSNorm(nn.Module):
    kernel_backend: KernelBackend = DEFAULT_KERNEL_BACKEND  # a model's own, set at load (apply_kernel_backend)

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.normalized_shape = (hidden_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> x / rms(x) * weight, statistics in float32 whatever x's dtype."""
        if self.kernel_backend.use_cpu_ops(x):
            return torch.ops.inferd.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def forward_with_residual(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None means x is the first residual stream value."""
        if residual is not None:
            if self.kernel_backend.use_cpu_ops(x):
                return torch.ops.inferd.add_rms_norm(x, residual, self.weight, self.eps)
            x = x + residual
        return self.forward(x), x
