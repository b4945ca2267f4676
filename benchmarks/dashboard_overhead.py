"""What watching the dashboard costs: output tokens/s of one `inferd serve` with and without a poller fetching
`/dashboard/data` once a second as the page does (the whole buffer once, then `?since=` the newest sample; `--full`:
the whole ten-minute buffer every second, the worst case).

    .venv/bin/python benchmarks/dashboard_overhead.py [--model smollm2-135m-instruct] [--concurrency 16]
        [--num-prompts 64] [--input-len 64] [--output-len 32] [--repeats 5] [--kv-cache-memory 512MiB] [--full]

One server for every run (its sampler reads the metrics once a second in both arms: that is part of the server, not
of watching it). The load is `inferd bench serve`'s own generator (the same code, in this process): --concurrency
streams, --num-prompts requests, fixed lengths (ignore_eos). Runs alternate (without, with, without, ...) after one
warm-up run; each arm's median output tokens/s gives the ratio. The poller's answers are timed too: mean server
time per call / 1 s is the share of one core the polling takes, a figure less exposed to noise than the ratio.
Goal (issue 14): the poller costs < 1% of throughput at 16 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from inferd.bench.plan import ServeProcess  # noqa: E402
from inferd.bench.serve import add_serve_arguments, run_serve_async  # noqa: E402


async def poll_dashboard(base_url: str, period_s: float, is_full: bool, call_times_s: list[float],
                         sizes: list[int]) -> None:
    """As the page polls: the whole buffer first, then `?since=` the newest sample seen (every call whole if
    `is_full`)."""
    last_t = None
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        next_s = time.monotonic()
        while True:
            started = time.perf_counter()
            response = await client.get("/dashboard/data", params={} if is_full or last_t is None else {"since": last_t})
            response.raise_for_status()
            call_times_s.append(time.perf_counter() - started)
            sizes.append(len(response.content))
            times = response.json()["t"]
            last_t = times[-1] if times else last_t
            next_s += period_s
            await asyncio.sleep(max(next_s - time.monotonic(), 0.0))


async def one_run(base_url: str, args: argparse.Namespace, seed: int, is_polled: bool,
                  call_times_s: list[float], sizes: list[int]) -> float:
    """Output tokens/s of one bench run (with the poller running through it when `is_polled`)."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    bench_args = parser.parse_args([
        "--base-url", base_url, "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--max-concurrency", str(args.concurrency), "--seed", str(seed),
        "--num-warmups", "0", "--disable-tqdm",
    ])
    bench_args.api_key = None
    poller = (asyncio.create_task(poll_dashboard(base_url, 1.0, args.full, call_times_s, sizes)) if is_polled
              else None)
    try:
        result = await run_serve_async(bench_args)
    finally:
        if poller is not None:
            poller.cancel()
    (point,) = result["points"]
    assert point["failed"] == 0 and point["num_output_len_mismatch"] == 0, point["errors"]
    return point["output_throughput"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="runs per arm")
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--full", action="store_true", help="poll the whole buffer every time (the worst case), "
                                                             "not incrementally as the page does")
    args = parser.parse_args()

    serve_args = ["--max-model-len", "2048", "--kv-cache-memory", args.kv_cache_memory,
                  "--max-num-seqs", str(args.concurrency)]
    server = ServeProcess(args.model, "auto", serve_args, startup_timeout_s=900.0)
    throughputs: dict[bool, list[float]] = {False: [], True: []}
    call_times_s: list[float] = []
    sizes: list[int] = []
    try:
        # Fills the dashboard's buffer a little and warms the engine; not counted.
        asyncio.run(one_run(server.base_url, args, 10_000, False, [], []))
        for repeat in range(args.repeats):
            for is_polled in (False, True) if repeat % 2 == 0 else (True, False):
                tokens_per_s = asyncio.run(one_run(server.base_url, args, repeat * 2 + is_polled, is_polled,
                                                   call_times_s, sizes))
                throughputs[is_polled].append(tokens_per_s)
                print(f"repeat {repeat} {'with poller   ' if is_polled else 'without poller'} "
                      f"{tokens_per_s:8.1f} output tok/s  load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        server.stop()

    without, with_poller = statistics.median(throughputs[False]), statistics.median(throughputs[True])
    print(f"\npoller: {'whole buffer every call' if args.full else 'as the page: whole buffer once, then ?since='}")
    print(f"model {args.model}, {args.concurrency} concurrent streams, {args.num_prompts} requests of "
          f"{args.input_len} in / {args.output_len} out tokens, {args.repeats} runs per arm, alternating")
    print(f"median output tok/s without poller {without:.1f}  (runs: {', '.join(f'{v:.1f}' for v in throughputs[False])})")
    print(f"median output tok/s with poller    {with_poller:.1f}  (runs: {', '.join(f'{v:.1f}' for v in throughputs[True])})")
    print(f"with / without = {with_poller / without:.4f}  (cost {100 * (1 - with_poller / without):+.2f}%)")
    if call_times_s:
        mean_ms = 1000 * statistics.mean(call_times_s)
        print(f"/dashboard/data under load: {len(call_times_s)} calls, mean {mean_ms:.2f} ms, median "
              f"{1000 * statistics.median(call_times_s):.2f} ms, max {1000 * max(call_times_s):.2f} ms, "
              f"mean body {statistics.mean(sizes) / 1024:.1f} KiB -> at most {mean_ms / 10:.2f}% of one second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
