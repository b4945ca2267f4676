"""Speculative decoding speed: `--speculative auto` vs `off`, same model, prompts and machine, one run.

    .venv/bin/python benchmarks/spec_decode.py [--model smollm2-135m-instruct] [--new-tokens 160]
        [--batch 16] [--batch-new-tokens 64] [--repeats 3]

1. Single stream, input-grounded: each task of benchmarks/spec_decode_tasks.json (edit a function of this
   repository: rename a variable, add a docstring; the answer copies most of the input) alone, greedy,
   `--new-tokens` tokens (ignore_eos). Reported: decode tokens/s (output tokens after the first / time from the
   first to the last token) and end-to-end tokens/s (prefill included), summed over the tasks; the greedy tokens
   of auto and off are checked identical.
2. Under load: `--batch` concurrent chat prompts (benchmarks/offline.py's PROMPTS, not input-grounded),
   `--batch-new-tokens` each; output tokens / wall time.
Both engines are loaded once; runs alternate (off, auto, off, auto, ...) and the median of `--repeats` is
reported, because these 2-core machines are noisy. The auto engine's draft / accepted counters are printed.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=0, help="use only the first N tasks (0: all)")
    args = ap.parse_args()

    from inferd import LLM

    # 512 MiB of KV cache each (~6k tokens): the two engines share a 24 GiB machine with other work.
    llms = {mode: LLM(model=args.model, dtype="float32", device="cpu", speculative=mode, kv_cache_memory="512MiB")
            for mode in ("off", "auto")}
    tok = llms["off"].tokenizer
    tasks = json.loads(TASKS_PATH.read_text())
    if args.tasks:
        tasks = tasks[: args.tasks]
    grounded = [chat_prompt_ids(tok, f"{t['instruction']}\n\n```python\n{t['code']}\n```") for t in tasks]
    loaded = [chat_prompt_ids(tok, p) for p in PROMPTS[: args.batch]]
    print(f"model {args.model}; {len(tasks)} grounded tasks (prompts {min(map(len, grounded))}-"
          f"{max(map(len, grounded))} tokens, {args.new_tokens} new each); batch {len(loaded)} x "
          f"{args.batch_new_tokens} new; {args.repeats} repeats, alternating", flush=True)

    decode = {m: [] for m in llms}
    e2e = {m: [] for m in llms}
    batch = {m: [] for m in llms}
    tokens_of = {}
    for r in range(args.repeats):
        for mode, llm in llms.items():
            d, e, ids = run_single(llm, grounded, args.new_tokens)
            decode[mode].append(d)
            e2e[mode].append(e)
            tokens_of[mode] = ids
            print(f"  repeat {r}: single {mode:4s} decode {d:6.1f} tok/s, end-to-end {e:6.1f} tok/s", flush=True)
        for mode, llm in llms.items():
            drafts_before = llm.engine.get_stats().num_spec_draft_tokens
            b = run_batch(llm, loaded, args.batch_new_tokens)
            batch[mode].append(b)
            num_drafts = llm.engine.get_stats().num_spec_draft_tokens - drafts_before
            print(f"  repeat {r}: batch  {mode:4s} {b:6.1f} tok/s ({num_drafts} draft tokens verified)", flush=True)
    stats = llms["auto"].engine.get_stats()
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in
           (("decode", decode), ("e2e", e2e), ("batch", batch))}
    print(f"greedy tokens identical auto vs off: {tokens_of['auto'] == tokens_of['off']}")
    print(f"auto: {stats.num_spec_draft_tokens} draft tokens verified, {stats.num_spec_accepted_tokens} accepted "
          f"({stats.num_spec_accepted_tokens / max(1, stats.num_spec_draft_tokens):.0%})")
    print("| workload | off tok/s | auto tok/s | auto / off |")
    print("|---|---:|---:|---:|")
    for name, key in (("single stream, grounded: decode", "decode"), ("single stream, grounded: end-to-end", "e2e"),
                      (f"{len(loaded)} concurrent, chat prompts", "batch")):
        print(f"| {name} | {med[key]['off']:.1f} | {med[key]['auto']:.1f} | {med[key]['auto'] / med[key]['off']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
