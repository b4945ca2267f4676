"""Keep-alive reload: first token after an unload, in one process, with the load broken down by phase.

    PYTHONPATH=. .venv/bin/python benchmarks/reload.py [--model smollm2-135m-instruct] [--repeats 5]
        [--kv-cache-memory 2GiB]

What `inferd serve --keep-alive` does on the first request after an unload: `AsyncEngine.from_path` (what
`state.load_model` calls), start, one request to its first token. Two sides, alternating after one warm-up each:
  - source:   the model file read and prepared again (GGUF parse, un-permute, repack), no prepared-weights dir
  - prepared: `prepared_weights_dir` set (what `inferd serve` uses): the finished weights are mapped from the file
              written by the first load (models/prepared.py)
Before every reload the previous engine is shut down and collected, as the keep-alive reaper does. Phases
(LLMEngine.load_timings_s): kernels (0 once loaded in this process), weights (read + build), tokenizer, kv_cache
(allocate and zero the pool); first step = start to first token. Medians of --repeats. Goal: prepared <= 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time

PROMPT = "The capital of France is"


async def reload_once(path: str, options: dict) -> dict[str, float]:
    from inferd.engine.async_engine import AsyncEngine
    from inferd.request import SamplingParams

    started = time.perf_counter()
    engine = AsyncEngine.from_path(path, options)
    loaded = time.perf_counter()
    engine.start()
    stream = await engine.add_request("reload", PROMPT, SamplingParams(max_tokens=1, temperature=0.0))
    token_ids: list[int] = []
    async for output in stream:
        token_ids = output.outputs[0].token_ids
    first_token = time.perf_counter()
    row = dict(engine.engine.load_timings_s)
    row["first_step"] = first_token - loaded
    row["total"] = first_token - started
    row["token"] = float(token_ids[0])
    engine.shutdown()
    del engine, stream
    gc.collect()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-memory", default="2GiB", help="the server's CPU default")
    args = parser.parse_args()

    from inferd.kernels import cpu_flags_summary
    from inferd.store import resolve_model

    path = str(resolve_model(args.model).path)
    prepared_dir = tempfile.mkdtemp(prefix="inferd-prepared-")
    sides = {
        "source": {"kv_cache_memory": args.kv_cache_memory},
        "prepared": {"kv_cache_memory": args.kv_cache_memory, "prepared_weights_dir": prepared_dir},
    }
    print(f"model {args.model} ({path}); CPU flags: {cpu_flags_summary()}", file=sys.stderr)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for name, options in sides.items():  # warm-up: kernels loaded, the prepared file written
        asyncio.run(reload_once(path, options))
    for _ in range(args.repeats):
        for name, options in sides.items():
            rows[name].append(asyncio.run(reload_once(path, options)))
    tokens = {name: {r["token"] for r in side_rows} for name, side_rows in rows.items()}
    assert tokens["source"] == tokens["prepared"] and len(tokens["source"]) == 1, tokens
    phases = ["kernels", "weights", "tokenizer", "kv_cache", "first_step", "total"]
    print(f"\nmedian seconds over {args.repeats} reloads (first token after an unload)")
    print(f"{'side':<10}" + "".join(f"{p:>12}" for p in phases))
    for name, side_rows in rows.items():
        print(f"{name:<10}" + "".join(f"{statistics.median(r[p] for r in side_rows):>12.3f}" for p in phases))
    ratio = statistics.median(r["total"] for r in rows["source"]) / statistics.median(r["total"] for r in rows["prepared"])
    print(f"prepared is {ratio:.1f}x faster than source; same first token ({int(next(iter(tokens['source'])))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
