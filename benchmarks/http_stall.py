"""How long a big request body holds up other requests: /health latency while 4 MB bodies arrive.

    python benchmarks/http_stall.py [--model NAME] [--repeats 5]

Starts `inferd serve` twice: as shipped, and with every body parsed by FastAPI on the event loop (the peer). A
poller asks /health every 5 ms; meanwhile each kind of 4 MB body is POSTed `--repeats` times. Reported: the
poller's median and max latency while idle and during each kind of big body. The server parses
bodies of 64 KiB and more off the event loop (inferd/server/bodies.py); a body that stalls the loop shows as a
max /health latency of hundreds of milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def bodies(model: str) -> dict[str, bytes]:
    chat_turn = {"role": "user", "content": "hello world hello world"}
    return {
        "prompt-token-ids-4MB": json.dumps({"model": model, "prompt": list(range(1000, 1000 + 600_000))}).encode(),
        "messages-4MB": json.dumps({"model": model, "messages": [chat_turn] * 90_000, "max_tokens": 1}).encode(),
        "prompt-list-4MB": json.dumps({"model": model, "prompt": ["hi there"] * 400_000, "max_tokens": 1}).encode(),
    }


def poll(base_url: str, stop: threading.Event, latencies_s: list[float]) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while not stop.is_set():
            started = time.perf_counter()
            http.get("/health")
            latencies_s.append(time.perf_counter() - started)
            time.sleep(0.005)


def measure(base_url: str, path: str, body: bytes | None, repeats: int) -> list[float]:
    latencies_s: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(base_url, stop, latencies_s))
    poller.start()
    with httpx.Client(base_url=base_url, timeout=300) as http:
        for _ in range(repeats):
            if body is None:
                time.sleep(1.0)
            else:
                http.post(path, content=body, headers={"Content-Type": "application/json"})
    stop.set()
    poller.join()
    return latencies_s


def start_server(model: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from inferd.cli import main; sys.exit(main())", "serve", "--model", model,
         "--port", str(port), "--max-model-len", "2048", "--kv-cache-memory", "256MiB", "--max-body-bytes", "8MiB",
         "--log-level", "warning"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, stdout=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("inferd serve did not become healthy")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'server':<26} {'while':<24} {'bytes':>10} {'/health p50 ms':>15} {'/health max ms':>15} {'polls':>6}")
    # The peer: the same server with every body parsed by FastAPI on the event loop.
    for label, env in (("inferd (off-loop >=64KiB)", {}),
                       ("FastAPI on the loop", {"INFERD_OFF_LOOP_MIN_BYTES": str(1 << 40)})):
        port = 8931
        process = start_server(args.model, port, env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            cases: list[tuple[str, str, bytes | None]] = [("idle", "", None)]
            cases += [(name, "/v1/chat/completions" if "messages" in name else "/v1/completions", body)
                      for name, body in bodies(args.model).items()]
            for name, path, body in cases:
                latencies_ms = [1e3 * s for s in measure(base_url, path, body, args.repeats)]
                print(f"{label:<26} {name:<24} {len(body or b''):>10} {statistics.median(latencies_ms):>15.1f} "
                      f"{max(latencies_ms):>15.1f} {len(latencies_ms):>6}", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
