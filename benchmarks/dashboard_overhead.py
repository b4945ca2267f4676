"""What watching the dashboard costs: output tokens/s of one `inferd serve` with and without a poller fetching
`/dashboard/data` once a second as the page does (the whole buffer once, then `?since=` the newest sample; `--full`:
the whole ten-minute buffer every second, the worst case).

    .venv/bin/python benchmarks/dashboard_overhead.py [--model smollm2-135m-instruct] [--concurrency 16]
        [--num-prompts 64] [--input-len 64] [--output-len 32] [--repeats 5] [--kv-cache-memory 512MiB] [--full]

One server for every run (its sampler reads the metrics once a second in both arms: that is part of the server, not
of watching it). The load is `inferd bench serve`'s own generator (the same code, in this process): --concurrency
streams, --num-prompts requests, fixed lengths (ignore_eos). Runs alternate (without, with, without, ...) after one
warm-up run; each arm's median output tokens/s gives the ratio. The poller's round trips are timed too (under
load they mostly wait for the CPU), and, on the idle server, the CPU time (/proc) one call costs beyond the CPU the server
spends anyway in the same wall time: CPU ms per call / 1000 ms is the share of one core a one-per-second poller
takes, a figure far less exposed to a noisy machine than the throughput ratio.
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


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_per_call_ms(base_url: str, pid: int, is_full: bool, num_calls: int) -> tuple[float, float]:
    """CPU ms the idle server spends per /dashboard/data call: CPU over `num_calls` back-to-back calls minus the
    CPU of the same wall time with no calls (the sampler and the idle loops), divided by the calls. Also returns
    the body size in KiB."""
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        last_t = client.get("/dashboard/data").json()["t"][-1]
        cpu_start_s, wall_start_s = process_cpu_s(pid), time.perf_counter()
        num_bytes = 0
        for _ in range(num_calls):
            params = {} if is_full else {"since": last_t}
            response = client.get("/dashboard/data", params=params)
            num_bytes += len(response.content)
        busy_cpu_s, wall_s = process_cpu_s(pid) - cpu_start_s, time.perf_counter() - wall_start_s
    cpu_start_s = process_cpu_s(pid)
    time.sleep(wall_s)
    idle_cpu_s = process_cpu_s(pid) - cpu_start_s
    return 1000 * max(busy_cpu_s - idle_cpu_s, 0.0) / num_calls, num_bytes / num_calls / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="runs per arm")
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--num-cpu-calls", type=int, default=300, help="calls timed for the CPU-per-call figure")
    parser.add_argument("--full", action="store_true", help="poll the whole buffer every time (the worst case), "
                                                             "not incrementally as the page does")
    args = parser.parse_args()

    serve_args = ["--max-model-len", "2048", "--kv-cache-memory", args.kv_cache_memory,
                  "--max-num-seqs", str(args.concurrency)]
    server = ServeProcess(args.model, "auto", serve_args, startup_timeout_s=900.0)
    throughputs: dict[bool, list[float]] = {False: [], True: []}
    call_times_s: list[float] = []
    sizes: list[int] = []
    cpu_per_call: dict[bool, tuple[float, float]] = {}
    try:
        # Fills the dashboard's buffer a little and warms the engine; not counted.
        asyncio.run(one_run(server.base_url, args, 10_000, False, [], []))
        for is_full in (False, True):
            cpu_per_call[is_full] = server_cpu_per_call_ms(server.base_url, server.process.pid, is_full,
                                                           args.num_cpu_calls)
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
        print(f"/dashboard/data round trips under load (client clock, mostly waiting for a CPU): {len(call_times_s)} "
              f"calls, mean {mean_ms:.2f} ms, median {1000 * statistics.median(call_times_s):.2f} ms, max "
              f"{1000 * max(call_times_s):.2f} ms, mean body {statistics.mean(sizes) / 1024:.1f} KiB")
    for is_full, (cpu_ms, body_kib) in cpu_per_call.items():
        print(f"server CPU per call, idle server ({args.num_cpu_calls} calls, {'whole buffer' if is_full else 'since'}): "
              f"{cpu_ms:.2f} ms for {body_kib:.1f} KiB -> one call a second = {cpu_ms / 10:.3f}% of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
