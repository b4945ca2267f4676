"""Layer 2: QuantLinear, a Linear whose weight is block-quantized (q4 or q8, see formats.py), with float32
activations (the exact reference kernels) or int8 activations (each row quantized per block of 32 inside the
kernel, integer dot products: csrc/cpu_int8_linear.cpp).

Loading fills a row-major staging copy shard by shard (stacked projections such as qkv arrive as three
tensors); `finalize()` packs it into the kernels' tile layout and drops the staging copy.
forward: one kernel call for any number of rows. Few rows (decode) dequantize in registers as the compact
weights stream by; many rows (prefill) unpack each 32-row slice once into an L2 buffer and run a
register-blocked GEMM on it, about as fast as torch's float32 GEMM (benchmarks/quant_kernels.py).
"""

from __future__ import annotations

import torch
from torch import nn

from inferd.quant.formats import BLOCK_SIZE, Q6_BLOCK_SIZE, BlockQuantized, pack, pack_a8, quantize, unpack_a8

INT8_ACTIVATIONS_SUFFIX = "+a8"  # a plan's kind "q4+a8": q4 weights, int8 activations


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, kind: str, bias: bool,
                 int8_activations: bool = False) -> None:
        """kind: "q4" | "q8", or with INT8_ACTIVATIONS_SUFFIX ("q4+a8", "q6+a8", "q5+a8": q6 (GGUF's Q6_K) and q5
        (Q5_1, Q5_K) have int8-activation kernels only), as plan_quantization gives it, for int8_activations=True."""
        super().__init__()
        if kind.endswith(INT8_ACTIVATIONS_SUFFIX):
            kind, int8_activations = kind[: -len(INT8_ACTIVATIONS_SUFFIX)], True
        if kind not in ("q4", "q8", "q6", "q5") or (kind in ("q6", "q5") and not int8_activations):
            raise ValueError(f"QuantLinear kind must be q4 or q8 (or q6, q5 with int8 activations), got {kind!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.kind = kind
        self.int8_activations = int8_activations
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._staging: BlockQuantized | None = None
        # Packed tensors (buffers, set by finalize): qs, scales and, for q4, mins.
        self.qs: torch.Tensor | None
        self.scales: torch.Tensor | None
        self.mins: torch.Tensor | None
        for name in ("qs", "scales", "mins"):
            self.register_buffer(name, None)

    def extra_repr(self) -> str:
        activations = "int8" if self.int8_activations else "float32"
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"activations={activations}")

    # ---- loading ---------------------------------------------------------------------------------------------
    def load_rows(self, row_offset: int, weight: torch.Tensor | BlockQuantized) -> None:
        """Rows [row_offset, row_offset + n) of the weight, given as float [n, K] (quantized here) or as a
        BlockQuantized of this layer's kind (taken as is: e.g. a GGUF tensor's own blocks)."""
        if isinstance(weight, BlockQuantized) and weight.kind != self.kind:
            weight = weight.dequantize()
        if not isinstance(weight, BlockQuantized):
            weight = quantize(weight, self.kind) if self.kind not in ("q6", "q5") else weight
        if not isinstance(weight, BlockQuantized):
            raise ValueError(f"a {self.kind} layer takes GGUF blocks only (q6: Q6_K; q5: Q5_1, Q5_K)")
        n, k = weight.shape
        if k != self.in_features or row_offset + n > self.out_features:
            raise ValueError(f"rows [{row_offset}, {row_offset + n}) x {k} do not fit a "
                             f"[{self.out_features}, {self.in_features}] weight")
        if self._staging is None:
            q_dtype = torch.int8 if self.kind == "q8" else torch.uint8
            num_blocks = self.in_features // BLOCK_SIZE
            num_scales = self.in_features // Q6_BLOCK_SIZE if self.kind == "q6" else num_blocks
            self._staging = BlockQuantized(
                self.kind,
                torch.zeros(self.out_features, self.in_features, dtype=q_dtype),
                torch.zeros(self.out_features, num_scales),
                torch.zeros(self.out_features, num_blocks) if self.kind in ("q4", "q5") else None,
            )
        s = self._staging
        s.q[row_offset : row_offset + n].copy_(weight.q)
        s.scales[row_offset : row_offset + n].copy_(weight.scales)
        if s.mins is not None:
            s.mins[row_offset : row_offset + n].copy_(weight.mins)

    def finalize(self) -> None:
        if self._staging is None:
            raise ValueError("QuantLinear.finalize before any weight rows were loaded")
        packed = pack_a8(self._staging) if self.int8_activations else pack(self._staging)
        for name, tensor in packed.items():
            setattr(self, name, tensor)
        self._staging = None
        self._refresh_kernel_args()

    def _refresh_kernel_args(self) -> None:
        # The kernel's tensor arguments as one plain attribute: buffers go through nn.Module.__getattr__, about a
        # microsecond each, ~500 times a decode step.
        self._kernel_args = (self.qs, self.scales) if self.mins is None else (self.qs, self.scales, self.mins)
        ops = torch.ops.inferd
        if self.int8_activations:
            self._kernel = {"q8": ops.q8_a8_linear, "q4": ops.q4_a8_linear, "q6": ops.q6_a8_linear,
                            "q5": ops.q5_a8_linear}[self.kind]
        else:
            self._kernel = ops.q8_linear if self.kind == "q8" else ops.q4_linear

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: keep the plain attribute on the new buffers
        result = super()._apply(fn, recurse)
        if self.qs is not None:
            self._refresh_kernel_args()
        return result

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins) if t is not None)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out_features, in_features] (a transposed view of a contiguous [in, out] matrix, which GEMMs
        take as is), bit-exact to formats.BlockQuantized.dequantize."""
        if self.int8_activations:
            packed = {"qs": self.qs, "scales": self.scales, "mins": self.mins}
            return unpack_a8(self.kind, packed).dequantize().t().contiguous().t()
        if self.kind == "q4":
            return torch.ops.inferd.q4_dequantize_t(self.qs, self.scales, self.mins).t()
        return torch.ops.inferd.q8_dequantize_t(self.qs, self.scales).t()

    # ---- compute ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] float32 -> [..., out_features] float32."""
        y = self._kernel(x, *self._kernel_args)
        bias = self.bias
        return y if bias is None else y.add_(bias)
