"""The block-quantized matmul kernels against float32 torch matmuls, over the row counts an engine step has.

    .venv/bin/python benchmarks/quant_kernels.py [--rows 1,4,16,64,128,256] [--repeats 5]
        [--a8-paths avx512-vnni,avx2-vnni,avx2] [--threads N] [--weights smollm2|gemma3-kquants|gemma3-q5kquants]

Weights: the linear layers of SmolLM2-135M (30 layers of qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536) plus the tied output projection 49152x576, random values, so a pass streams the whole model's
weights as a decode step does. Per row count it prints the time of one pass (median of --repeats, the
variants alternating within each repeat so that a noisy neighbour hits them alike) for: float32 F.linear,
QuantLinear with float32 activations (q4/q8 kernels, the exact reference) and QuantLinear with int8
activations on each kernel path of --a8-paths (default: every path this CPU runs but the portable one).
The float-activation kernels run the CPU's best path (INFERD_CPU_KERNEL=avx2 gives them as an AVX2-only CPU runs
them: the portable kernels compiled for x86-64-v3). --threads 1 keeps
a busy machine from descheduling one of the threads a parallel kernel waits on (which then measures the
neighbours, not the kernel).

--weights gemma3-kquants: the K-quant layers of gemma-3-270m's Q4_K_M file instead (18 attention outputs 640x1024
Q4_K, 9 MLP downs 640x2048 Q4_K and 9 Q6_K; random super-blocks), where the peer is float32 F.linear on the
dequantized weights, which is what inferd ran for K-quant tensors before (there are no float-activation K-quant
kernels). --weights gemma3-q5kquants: the same shapes as a Q5_K_M file holds them (Q5_K where Q4_K_M has Q4_K).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from inferd.kernels import cpu_kernels_available, cpu_flags_summary, has_avx512_kernels, kernel_build_error
from inferd.quant.formats import GGUF_SUPER_BLOCK_BYTES, QK_K, from_gguf, quantize
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


KQUANT_LAYERS = [("Q4_K", 640, 1024)] * 18 + [("Q4_K", 640, 2048)] * 9 + [("Q6_K", 640, 2048)] * 9
Q5_KQUANT_LAYERS = [("Q5_K" if t == "Q4_K" else t, n, k) for t, n, k in KQUANT_LAYERS]


def random_k_quant(type_name: str, n: int, k: int, rng) -> "np.ndarray":
    """Random super-blocks (any quant and sub-scale bits) with float16 super-scales around 1e-3."""
    import numpy as np

    num = n * k // QK_K
    raw = rng.integers(0, 256, size=(num, GGUF_SUPER_BLOCK_BYTES[type_name]), dtype=np.uint8)
    offset, count = (0, 2) if type_name in ("Q4_K", "Q5_K") else (208, 1)
    raw[:, offset : offset + 2 * count] = (rng.uniform(0.5, 1.5, (num, count)) * 1e-3).astype(np.float16).view(np.uint8)
    return raw


def build_k_quants(shapes: list[tuple[str, int, int]]) -> list[tuple[torch.Tensor, None, QuantLinear]]:
    import numpy as np

    rng = np.random.default_rng(0)
    layers = []
    for type_name, n, k in shapes:
        bq = from_gguf(type_name, random_k_quant(type_name, n, k, rng), (n, k))
        layer = QuantLinear(k, n, bq.kind, bias=False, int8_activations=True)
        layer.load_rows(0, bq)
        layer.finalize()
        layers.append((bq.dequantize(), None, layer))
    return layers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,16,64,128,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--a8-paths", default="", help="comma-separated int8 kernel paths (default: all but portable)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--weights", default="smollm2", choices=["smollm2", "gemma3-kquants", "gemma3-q5kquants"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_kernels_available():
        raise SystemExit(f"inferd's CPU kernels did not build: {kernel_build_error()}")
    float_path = torch.ops.inferd.cpu_kernel_path("")  # INFERD_CPU_KERNEL's, else the best
    paths = args.a8_paths.split(",") if args.a8_paths else [p for p in torch.ops.inferd.cpu_kernel_paths()
                                                            if p != "portable"]
    k_quants = args.weights != "smollm2"
    k_shapes = Q5_KQUANT_LAYERS if args.weights == "gemma3-q5kquants" else KQUANT_LAYERS
    layers = build_k_quants(k_shapes) if k_quants else build()
    quant_bytes = sum(layer.weight_bytes() for _, _, layer in layers)
    float_bytes = sum(w.numel() * 4 for w, _, _ in layers)
    float_kernels = "AVX-512" if has_avx512_kernels() else "portable"
    print(f"{torch.get_num_threads()} threads; float-activation kernels: {float_kernels} (path {float_path}); "
          f"CPU: {cpu_flags_summary()}; weights: {args.weights}")
    print(f"weights per pass: float32 {float_bytes / 1e6:.0f} MB, int8-activation layout {quant_bytes / 1e6:.0f} MB\n")
    peer = 0 if k_quants else 1  # the column the int8 paths are compared with
    names = ["float32 F.linear (dequantized)" if k_quants else "float32 F.linear"]
    names += [] if k_quants else [f"q4/q8 float act. ({float_kernels})"]
    names += [f"int8 act. {p}" for p in paths]
    print("| rows | " + " | ".join(f"{n} ms" for n in names) + " | " +
          " | ".join(f"{p} vs {'F.linear' if k_quants else 'float act.'}" for p in paths) + " |")
    print("|---" * (1 + len(names) + len(paths)) + "|")
    for num_rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(num_rows, k) for k in {w.shape[1] for w, _, _ in layers}}

        def run_float():
            for w, _, _ in layers:
                F.linear(xs[w.shape[1]], w)

        def run_kernel():
            torch.ops.inferd.cpu_kernel_path(float_path)
            for _, layer, _ in layers:
                layer(xs[layer.in_features])

        def run_a8(path):
            def run():
                torch.ops.inferd.cpu_kernel_path(path)
                for _, _, layer in layers:
                    layer(xs[layer.in_features])
            return run

        fns = [run_float] + ([] if k_quants else [run_kernel]) + [run_a8(p) for p in paths]
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
              " | ".join(f"{med[peer] / t:.2f}x" for t in med[len(fns) - len(paths):]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
