"""Speculative decoding speed: `--speculative off` and each other mode, same model, prompts and machine, one run.

    .venv/bin/python benchmarks/spec_decode.py [--model smollm2-135m-instruct] [--new-tokens 160]
        [--batch 16] [--batch-new-tokens 64] [--repeats 3] [--modes off,auto,ngram,draft]
        [--speculative-model self:8] [--draft-num-tokens 3]

1. Single stream, input-grounded: each task of benchmarks/spec_decode_tasks.json (edit a function of this
   repository: rename a variable, add a docstring; the answer copies most of the input) alone, greedy,
   `--new-tokens` tokens (ignore_eos). Reported: decode tokens/s (output tokens after the first / time from the
   first to the last token) and end-to-end tokens/s (prefill included), summed over the tasks; the greedy tokens
   of every mode are checked identical to off's.
2. Under load: `--batch` concurrent chat prompts (benchmarks/offline.py's PROMPTS, not input-grounded),
   `--batch-new-tokens` each; output tokens / wall time.
Modes: off (the peer), auto (the default: prompt lookup while few sequences run), ngram (prompt lookup always),
draft (the draft model `--speculative-model` always: a checkpoint with the same tokenizer, or self:K, the target's
first K layers). All engines are loaded once; runs alternate (off, auto, ..., then reversed: ..., auto, off) and
the median of `--repeats` is reported, because these 2-core machines are noisy. Each mode's draft / accepted counters, the CPU
flags and the load average (1-minute, before and after) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from offline import PROMPTS, chat_prompt_ids

TASKS_PATH = Path(__file__).with_name("spec_decode_tasks.json")


def run_single(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """Each prompt alone. -> (decode tokens/s, end-to-end tokens/s, token ids per prompt)."""
    from inferd import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine = llm.engine
    num_decode = num_total = 0
    decode_s = total_s = 0.0
    token_ids = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        m0 = time.monotonic()
        engine.add_request(f"single-{time.monotonic_ns()}-{i}", prompt, params, arrival_time=m0)
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                final = out
        total_s += time.perf_counter() - t0
        ids = final.outputs[0].token_ids
        token_ids.append(ids)
        num_total += len(ids)
        num_decode += len(ids) - 1
        decode_s += final.metrics.finished_time - final.metrics.first_token_time
    return num_decode / decode_s, num_total / total_s, token_ids


def run_batch(llm, prompts: list[list[int]], new_tokens: int) -> float:
    from inferd import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def cpu_flags() -> str:
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    keep = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    return " ".join(f for f in keep if f in flags)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=0, help="use only the first N tasks (0: all)")
    ap.add_argument("--modes", default="off,auto", help="comma-separated speculative modes; off always runs")
    ap.add_argument("--speculative-model", default="self:8",
                    help="the draft of mode draft: a model with the same tokenizer, or self:K (first K layers)")
    ap.add_argument("--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--draft-num-tokens", type=int, default=None,
                    help="k of mode draft (default: --num-speculative-tokens)")
    ap.add_argument("--kv-cache-memory", default="512MiB", help="per engine (they share the machine)")
    args = ap.parse_args()

    from inferd import LLM

    modes = ["off"] + [m for m in args.modes.split(",") if m and m != "off"]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, flags {cpu_flags()}; "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    draft_k = args.draft_num_tokens or args.num_speculative_tokens
    llms = {mode: LLM(model=args.model, dtype="float32", device="cpu", speculative=mode,
                      kv_cache_memory=args.kv_cache_memory,
                      num_speculative_tokens=draft_k if mode == "draft" else args.num_speculative_tokens,
                      speculative_model=args.speculative_model if mode == "draft" else None)
            for mode in modes}
    tok = llms["off"].tokenizer
    tasks = json.loads(TASKS_PATH.read_text())
    if args.tasks:
        tasks = tasks[: args.tasks]
    grounded = [chat_prompt_ids(tok, f"{t['instruction']}\n\n```python\n{t['code']}\n```") for t in tasks]
    loaded = [chat_prompt_ids(tok, p) for p in PROMPTS[: args.batch]]
    print(f"model {args.model}; modes {', '.join(modes)} (k = {args.num_speculative_tokens}; draft: "
          f"{args.speculative_model}, k = {draft_k}); {len(tasks)} grounded tasks (prompts {min(map(len, grounded))}-"
          f"{max(map(len, grounded))} tokens, {args.new_tokens} new each); batch {len(loaded)} x "
          f"{args.batch_new_tokens} new; {args.repeats} repeats, alternating", flush=True)

    decode = {m: [] for m in llms}
    e2e = {m: [] for m in llms}
    batch = {m: [] for m in llms}
    tokens_of = {}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        # Odd repeats run the modes in reverse order (ABBA), so no mode always runs first or right after another.
        order = [(m, llms[m]) for m in (modes if r % 2 == 0 else modes[::-1])]
        for mode, llm in order:
            d, e, ids = run_single(llm, grounded, args.new_tokens)
            decode[mode].append(d)
            e2e[mode].append(e)
            tokens_of[mode] = ids
            print(f"  repeat {r}: single {mode:5s} decode {d:6.1f} tok/s, end-to-end {e:6.1f} tok/s", flush=True)
        for mode, llm in order:
            drafts_before = llm.engine.get_stats().num_spec_draft_tokens
            b = run_batch(llm, loaded, args.batch_new_tokens)
            batch[mode].append(b)
            num_drafts = llm.engine.get_stats().num_spec_draft_tokens - drafts_before
            print(f"  repeat {r}: batch  {mode:5s} {b:6.1f} tok/s ({num_drafts} draft tokens verified)", flush=True)
        loads.append(os.getloadavg()[0])
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in
           (("decode", decode), ("e2e", e2e), ("batch", batch))}
    print(f"load average (1 min) per repeat: {' '.join(f'{x:.2f}' for x in loads)}")
    for mode in modes[1:]:
        stats = llms[mode].engine.get_stats()
        print(f"{mode}: greedy tokens identical to off: {tokens_of[mode] == tokens_of['off']}; "
              f"{stats.num_spec_draft_tokens} draft tokens verified, {stats.num_spec_accepted_tokens} accepted "
              f"({stats.num_spec_accepted_tokens / max(1, stats.num_spec_draft_tokens):.0%})")
    others = modes[1:]
    print("| workload | off tok/s | " + " | ".join(f"{m} tok/s | {m} / off" for m in others) + " |")
    print("|---|---:|" + "---:|---:|" * len(others))
    for name, key in (("single stream, grounded: decode", "decode"), ("single stream, grounded: end-to-end", "e2e"),
                      (f"{len(loaded)} concurrent, chat prompts", "batch")):
        cells = " | ".join(f"{med[key][m]:.1f} | {med[key][m] / med[key]['off']:.2f}x" for m in others)
        print(f"| {name} | {med[key]['off']:.1f} | {cells} |")
    if args.repeats > 1:
        ratios = [b / o for b, o in zip(batch.get("auto", []), batch["off"])]
        if ratios:
            print(f"batch auto / off per repeat: {' '.join(f'{x:.3f}' for x in ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
