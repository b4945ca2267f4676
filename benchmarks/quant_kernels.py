"""The block-quantized matmul kernels against float32 torch matmuls, over the row counts an engine step has.

    .venv/bin/python benchmarks/quant_kernels.py [--rows 1,4,16,64,128,256] [--repeats 5]

Weights: the linear layers of SmolLM2-135M (30 layers of qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536) plus the tied output projection 49152x576, random values, so a pass streams the whole model's
weights as a decode step does. Per row count it prints the time of one pass (median of --repeats) for:
float32 F.linear and QuantLinear (one q4/q8 kernel call per layer).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from inferd.kernels import cpu_kernels_available, kernel_build_error
from inferd.quant.linear import QuantLinear

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out_features, in_features)
NUM_LAYERS = 30
HEAD_SHAPE = (49152, 576)


def build() -> list[tuple[QuantLinear, torch.Tensor]]:
    layers = []
    gen = torch.Generator().manual_seed(0)
    shapes = LAYER_SHAPES * NUM_LAYERS + [HEAD_SHAPE]
    for i, (n, k) in enumerate(shapes):
        w = torch.randn(n, k, generator=gen) * 0.05
        layer = QuantLinear(k, n, "q8" if i == len(shapes) - 1 else "q4", bias=False)
        layer.load_rows(0, w)
        layer.finalize()
        layers.append((layer, layer.dequantized_weight()))
    return layers


def time_pass(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,16,64,128,256")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not cpu_kernels_available():
        raise SystemExit(f"inferd's CPU kernels did not build: {kernel_build_error()}")
    layers = build()
    quant_bytes = sum(layer.weight_bytes() for layer, _ in layers)
    float_bytes = sum(w.numel() * 4 for _, w in layers)
    print(f"{torch.get_num_threads()} threads; weights per pass: float32 {float_bytes / 1e6:.0f} MB, "
          f"block-quantized {quant_bytes / 1e6:.0f} MB\n")
    print("| rows | float32 F.linear ms | q4/q8 kernels ms | kernels vs float32 |")
    print("|---|---|---|---|")
    for num_rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(num_rows, k) for k in {k for _, k in LAYER_SHAPES}}

        def run_float():
            for layer, w in layers:
                F.linear(xs[layer.in_features], w)

        def run_kernel():
            for layer, _ in layers:
                layer(xs[layer.in_features])

        t_float = time_pass(run_float, args.repeats)
        t_kernel = time_pass(run_kernel, args.repeats)
        print(f"| {num_rows} | {t_float:.1f} | {t_kernel:.1f} | {t_float / t_kernel:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
