"""The block-quantized matmul kernels against float32 torch matmuls, over the row counts an engine step has.

    .venv/bin/python benchmarks/quant_kernels.py [--rows 1,4,16,64,128,256] [--repeats 5]
        [--a8-paths avx512-vnni,avx2-vnni,avx2] [--threads N]

Weights: the linear layers of SmolLM2-135M (30 layers of qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536) plus the tied output projection 49152x576, random values, so a pass streams the whole model's
weights as a decode step does. Per row count it prints the time of one pass (median of --repeats, the
variants alternating within each repeat so that a noisy neighbour hits them alike) for: float32 F.linear,
QuantLinear with float32 activations (q4/q8 kernels, the exact reference) and QuantLinear with int8
activations on each kernel path of --a8-paths (default: every path this CPU runs but the portable one).
INFERD_CPU_MARCH=x86-64-v3 builds the float-activation kernels as an AVX2-only CPU gets them. --threads 1 keeps
a busy machine from descheduling one of the threads a parallel kernel waits on (which then measures the
neighbours, not the kernel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from inferd.kernels import cpu_kernels_available, cpu_flags_summary, has_avx512_kernels, kernel_build_error
from inferd.quant.formats import quantize
from inferd.quant.linear import QuantLinear

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out_features, in_features)
NUM_LAYERS = 30
HEAD_SHAPE = (49152, 576)


def build() -> list[tuple[torch.Tensor, QuantLinear, QuantLinear]]:
    """Per layer: the dequantized float32 weight, the float-activation layer and the int8-activation layer."""
    layers = []
    gen = torch.Generator().manual_seed(0)
    shapes = LAYER_SHAPES * NUM_LAYERS + [HEAD_SHAPE]
    for i, (n, k) in enumerate(shapes):
        kind = "q8" if i == len(shapes) - 1 else "q4"
        bq = quantize(torch.randn(n, k, generator=gen) * 0.05, kind)
        pair = []
        for int8_activations in (False, True):
            layer = QuantLinear(k, n, kind, bias=False, int8_activations=int8_activations)
            layer.load_rows(0, bq)
            layer.finalize()
            pair.append(layer)
        layers.append((bq.dequantize(), *pair))
    return layers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,16,64,128,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--a8-paths", default="", help="comma-separated int8 kernel paths (default: all but portable)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_kernels_available():
        raise SystemExit(f"inferd's CPU kernels did not build: {kernel_build_error()}")
    paths = args.a8_paths.split(",") if args.a8_paths else [p for p in torch.ops.inferd.a8_kernel_paths()
                                                            if p != "portable"]
    layers = build()
    quant_bytes = sum(layer.weight_bytes() for _, layer, _ in layers)
    float_bytes = sum(w.numel() * 4 for w, _, _ in layers)
    float_kernels = "AVX-512" if has_avx512_kernels() else "portable"
    print(f"{torch.get_num_threads()} threads; -march={os.environ.get('INFERD_CPU_MARCH', 'native')} "
          f"(float-activation kernels: {float_kernels}); CPU: {cpu_flags_summary()}")
    print(f"weights per pass: float32 {float_bytes / 1e6:.0f} MB, block-quantized {quant_bytes / 1e6:.0f} MB\n")
    names = ["float32 F.linear", f"q4/q8 float act. ({float_kernels})"] + [f"int8 act. {p}" for p in paths]
    print("| rows | " + " | ".join(f"{n} ms" for n in names) + " | " +
          " | ".join(f"{p} vs float act." for p in paths) + " |")
    print("|---" * (1 + len(names) + len(paths)) + "|")
    for num_rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(num_rows, k) for k in {k for _, k in LAYER_SHAPES}}

        def run_float():
            for w, layer, _ in layers:
                F.linear(xs[layer.in_features], w)

        def run_kernel():
            for _, layer, _ in layers:
                layer(xs[layer.in_features])

        def run_a8(path):
            def run():
                torch.ops.inferd.a8_kernel_path(path)
                for _, _, layer in layers:
                    layer(xs[layer.in_features])
            return run

        fns = [run_float, run_kernel] + [run_a8(p) for p in paths]
        times: list[list[float]] = [[] for _ in fns]
        for fn in fns:
            fn()
        for _ in range(args.repeats):
            for fn, ts in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        med = [statistics.median(ts) * 1e3 for ts in times]
        print(f"| {num_rows} | " + " | ".join(f"{t:.1f}" for t in med) + " | " +
              " | ".join(f"{med[1] / t:.2f}x" for t in med[2:]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
