"""The exact response cache: how fast a hit answers, against the miss (the engine) for the same request.

    python benchmarks/response_cache.py [--model smollm2-135m-instruct] [--prompts 3] [--hits 30] [--max-tokens 256]

Starts one `inferd serve` (response cache on, its default size). For each of `--prompts` distinct prompts and
each shape (non-stream, stream with usage), one /v1/completions request of exactly `--max-tokens` tokens
(temperature 0, ignore_eos) is sent once (a miss: the engine runs) and then `--hits` times (hits). Reported,
medians over all prompts:
- server: arrival at the server (its guard middleware) to the answer built, from the hit's `server-timing`
  header (misses carry none);
- client: the whole request on loopback with a kept-alive httpx connection, hit and miss (the peer);
- the /health round trip in the same run (the HTTP floor of this machine and client).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
_CLI = "import sys; from inferd.cli import main; sys.exit(main())"
PROMPTS = ["The history of the printing press", "A recipe for bread:", "Rules of chess, explained simply:",
           "The water cycle", "How a bicycle works:", "A short story about a lighthouse keeper."]


def start_server(model: str, port: int) -> tuple[subprocess.Popen, str]:
    log = tempfile.NamedTemporaryFile(prefix="inferd-rcache-bench-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", _CLI, "serve", "--model", model, "--port", str(port), "--max-model-len", "2048",
         "--kv-cache-memory", "256MiB", "--log-level", "warning"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if process.poll() is not None:
            raise SystemExit(f"inferd serve exited with {process.returncode}; log: {log.name}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"inferd serve not healthy after 900 s; log: {log.name}")
        time.sleep(0.25)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_ms(response: httpx.Response) -> float:
    timing = response.headers["server-timing"]  # cache;dur=MS
    return float(timing.partition("dur=")[2])


def ms(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--hits", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    process, base_url = start_server(args.model, free_port())
    try:
        with httpx.Client(base_url=base_url, timeout=600) as http:
            health_ms = []
            for _ in range(args.hits):
                started = time.perf_counter()
                http.get("/health")
                health_ms.append((time.perf_counter() - started) * 1000)
            print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
                  f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; model {args.model}, "
                  f"{args.max_tokens} tokens per answer, {args.prompts} prompts x {args.hits} hits")
            print("| shape | answer bytes | miss, client ms | hit, client ms | hit, server ms | miss / hit (client) |")
            print("|---|---:|---:|---:|---:|---:|")
            for stream in (False, True):
                miss_ms: list[float] = []
                hit_ms: list[float] = []
                hit_server_ms: list[float] = []
                num_bytes = 0
                for prompt in PROMPTS[: args.prompts]:
                    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                            "ignore_eos": True}
                    if stream:
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                    started = time.perf_counter()
                    response = http.post("/v1/completions", json=body)
                    miss_ms.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200 and response.headers["x-inferd-cache"] == "miss", response.text
                    num_bytes = len(response.content)
                    for _ in range(args.hits):
                        started = time.perf_counter()
                        response = http.post("/v1/completions", json=body)
                        hit_ms.append((time.perf_counter() - started) * 1000)
                        assert response.headers["x-inferd-cache"] == "hit"
                        hit_server_ms.append(server_ms(response))
                ratio = statistics.median(miss_ms) / statistics.median(hit_ms)
                print(f"| {'stream' if stream else 'non-stream'} | {num_bytes} | {ms(miss_ms)} | {ms(hit_ms)} | "
                      f"{ms(hit_server_ms)} | {ratio:.0f}x |")
            print(f"| /health round trip (floor) | | | {ms(health_ms)} | | |")
            print(f"# hit, server ms: max {max(hit_server_ms):.2f} (stream shape)")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
