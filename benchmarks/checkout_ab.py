"""Single-stream decode and prefill of two inferd checkouts (e.g. main and a branch), alternating in one run.

    .venv/bin/python benchmarks/checkout_ab.py --checkouts /work/main,/work/wt/kern [--rounds 5]
        [--model smollm2-135m-instruct] [--new-tokens 128] [--prefill-tokens 512] [--quantization auto]

Each round starts one fresh process per checkout (PYTHONPATH = that checkout, so each loads its own kernel
build), in turn A, B, A, B, ...: a noisy neighbour hits both alike. A process loads the model (prefix caching
off, so every prompt is computed), warms up, then measures, 3 times each (median):
  decode ms/token: (time of a greedy run of 1 + new_tokens tokens - time of the same prompt with 1 token)
                   / new_tokens, one sequence;
  prefill ms:      time to the first token of one prefill_tokens-token prompt.
Prints each round's figures and the median over rounds per checkout, the CPU flags and the load average (each
checkout's kernels choose their path themselves: INFERD_CPU_KERNEL, if set, reaches both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import torch
from inferd import LLM, SamplingParams
model, new_tokens, prefill_tokens, quantization = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = LLM(model=model, quantization=quantization, enable_prefix_caching=False, max_model_len=2048)
words = ("the quick brown fox jumps over the lazy dog while a cat watches from the warm window " * 200).split()
decode_prompt = llm.tokenizer.encode("Explain how a bicycle stays upright while moving.")
prefill_prompt = llm.tokenizer.encode(" ".join(words))[:prefill_tokens]
one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
many = SamplingParams(temperature=0, max_tokens=1 + new_tokens, ignore_eos=True)

def timed(prompt, params):
    t0 = time.perf_counter()
    llm.generate([prompt], params)
    return time.perf_counter() - t0

timed(decode_prompt, many)  # warm-up
timed(prefill_prompt, one)
decode, prefill = [], []
for _ in range(3):
    decode.append((timed(decode_prompt, many) - timed(decode_prompt, one)) / new_tokens * 1e3)
    prefill.append(timed(prefill_prompt, one) * 1e3)
try:
    from inferd.kernels import cpu_kernel_path
    path = cpu_kernel_path()
except ImportError:  # a checkout from before one library served every path: its int8 path, chosen the same way
    path = torch.ops.inferd.a8_kernel_path("")
print(json.dumps({"decode_ms_per_token": statistics.median(decode), "prefill_ms": statistics.median(prefill),
                  "threads": torch.get_num_threads(), "kernel_path": path}))
"""


def cpu_flags() -> str:
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return " ".join(w for w in wanted if w in flags)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkouts", required=True, help="two comma-separated checkout roots (A,B)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--quantization", default="auto")
    args = ap.parse_args()
    checkouts = [os.path.abspath(c) for c in args.checkouts.split(",")]
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs; load average before: {os.getloadavg()}")
    results: dict[str, list[dict]] = {c: [] for c in checkouts}
    for round_id in range(args.rounds):
        for checkout in checkouts:
            env = {**os.environ, "PYTHONPATH": checkout}
            out = subprocess.run(
                [sys.executable, "-c", CHILD, args.model, str(args.new_tokens), str(args.prefill_tokens),
                 args.quantization],
                env=env, cwd=checkout, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            results[checkout].append(figures)
            print(f"round {round_id} {checkout}: {figures}; load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\nload average after: {os.getloadavg()}")
    print(f"| checkout | decode ms/token (median of {args.rounds}) | prefill {args.prefill_tokens} tokens ms | "
          "kernel path |\n|---|---|---|---|")
    for checkout, rows in results.items():
        decode = statistics.median(r["decode_ms_per_token"] for r in rows)
        prefill = statistics.median(r["prefill_ms"] for r in rows)
        print(f"| {checkout} | {decode:.2f} | {prefill:.0f} | {rows[0]['kernel_path']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
