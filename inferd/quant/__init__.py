"""Layer 2: weight quantization schemes, their registry, and which layers each one quantizes.

Schemes (`--quantization`):
- none:  weights in the model dtype (GGUF blocks are dequantized at load).
- gguf:  keep a GGUF file's Q4_0 / Q4_1 / Q8_0 / Q5_0 tensors in their own blocks (bit-exact weights, 0.75 / 1.125
         bytes per weight; Q5_0 as int8) and run them through the CPU kernels; other tensor types are dequantized.
- int8:  quantize float weights at load to 8 bits per weight, a float16 scale per 32 (Q8_0-like).
- int4:  quantize float weights at load to 4 bits, a float16 scale and min per 32 (Q4_1-like); the output
         projection (lm_head) gets int8, as llama.cpp's Q4 mixes keep it at higher precision.
- <scheme>-int8act (gguf-int8act, int8-int8act, int4-int8act): the same weights; each activation row is
         quantized to int8 per block of 32 inside the kernel (as llama.cpp's q8_0 / q8_1) and the dot products
         run in integers (AVX-512 VNNI / BW, AVX2 with or without AVX-VNNI, portable; chosen at run time).
         gguf-int8act also keeps the K-quants Q4_K and Q6_K (float32 scales: formats.py).
- auto:  for a GGUF file on CPU in float32: gguf-int8act where AUTO_INT8_ACTIVATIONS (its accuracy cost is within
         the gate: benchmarks/perplexity.py, RESULTS.md) and the CPU has AVX2; else gguf when the AVX-512
         float-activation kernels run here; else none (the portable float-activation kernels are correct but
         slower than float32 GEMMs). Any scheme can still be asked for explicitly.
The kernels are CPU float32 only for now: the quantized schemes on CUDA or in 16-bit dtypes raise a clear error.
"""

from __future__ import annotations

import sys

from inferd.config import QUANTIZATIONS
from inferd.kernels import cpu_kernels_available, has_avx512_kernels, has_int8_simd_kernels, kernel_build_error
from inferd.quant.formats import GGUF_KIND, BlockQuantized, can_quantize
from inferd.quant.linear import INT8_ACTIVATIONS_SUFFIX, QuantLinear

INT8_ACT_METHOD_SUFFIX = "-int8act"
# Whether auto picks int8 activations (gguf-int8act). Their accuracy passes the gate (+0.42% perplexity over float
# activations on 51,200 KJV tokens, gate +0.5%: benchmarks/perplexity.py, RESULTS.md), and a row's numbers do not
# depend on its company: the int8 kernels compute each row alone in exact integers plus a fixed float order, and on
# CPU every token's attention is one row of the fused decode kernel (layers/attention.py). So greedy tokens are
# the same batched vs alone, chunked vs whole prefill and with speculation on vs off (tests/test_quant.py,
# tests/test_cpu_ops.py, tests/test_spec_decode.py, tests/test_server.py).
AUTO_INT8_ACTIVATIONS = True

__all__ = [
    "GGUF_KIND",
    "QUANTIZATIONS",
    "BlockQuantized",
    "QuantLinear",
    "AUTO_INT8_ACTIVATIONS",
    "plan_quantization",
    "resolve_quantization",
    "split_quantization",
]


def split_quantization(method: str) -> tuple[str, bool]:
    """"gguf-int8act" -> ("gguf", True); "int4" -> ("int4", False)."""
    if method.endswith(INT8_ACT_METHOD_SUFFIX):
        return method[: -len(INT8_ACT_METHOD_SUFFIX)], True
    return method, False



def resolve_quantization(method: str, *, is_gguf: bool, device: str, dtype: str) -> str:
    """'auto' -> a concrete scheme; a concrete scheme is checked against the model, device and dtype."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    if method == "none":
        return method
    runs_here = device == "cpu" and dtype == "float32"
    if method == "auto":
        if is_gguf and runs_here:
            if AUTO_INT8_ACTIVATIONS and has_int8_simd_kernels():
                return "gguf" + INT8_ACT_METHOD_SUFFIX
            if has_avx512_kernels():
                return "gguf"
            reason = kernel_build_error() or "no AVX2 on this CPU (the portable kernels are slower than float32)"
            print(f"inferd: keeping the GGUF's blocks needs inferd's AVX2 or AVX-512 kernels; using float32 weights: "
                  f"{reason}", file=sys.stderr)
        return "none"
    if split_quantization(method)[0] == "gguf" and not is_gguf:
        raise ValueError(f"quantization {method!r} needs a .gguf model file; use int8 or int4 for other checkpoints")
    if not runs_here:
        raise ValueError(f"quantization {method!r} runs on CPU in float32 only (got device {device}, dtype {dtype})")
    if not cpu_kernels_available():
        raise ValueError(f"quantization {method!r} needs inferd's CPU kernels, which failed to build here: "
                         f"{kernel_build_error()}")
    return method


def plan_quantization(
    linears: dict[str, tuple[tuple[int, int], list[str]]],
    method: str,
    source_kinds: dict[str, str | None] | None = None,
) -> dict[str, str]:
    """Which linear layers to quantize, and to what kind ("q4" | "q8").

    linears: module path -> ([out_features, in_features], the checkpoint tensor names that fill it); the output
    projection's path is "lm_head". source_kinds (gguf): checkpoint tensor name -> its block kind or None.
    A layer is quantized only when its shape fits the kernels and, for gguf, all its tensors share one kind.
    For a -int8act method every kind carries QuantLinear's int8-activation suffix ("q4+a8")."""
    plan: dict[str, str] = {}
    if method == "none":
        return plan
    method, int8_activations = split_quantization(method)
    for path, (shape, sources) in linears.items():
        if not can_quantize(shape):
            continue
        if method == "gguf":
            kinds = {(source_kinds or {}).get(name) for name in sources}
            if len(kinds) == 1 and None not in kinds:
                plan[path] = kinds.pop()
        elif method == "int8":
            plan[path] = "q8"
        elif method == "int4":
            plan[path] = "q8" if path == "lm_head" else "q4"
        else:
            raise ValueError(f"no quantization plan for method {method!r}")
    if int8_activations:
        plan = {path: kind + INT8_ACTIVATIONS_SUFFIX for path, kind in plan.items()}
    return plan
