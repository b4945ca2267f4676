"""Memory footprint: `inferd serve` beside llama.cpp's llama-server on the same GGUF file, idle and under load.

    .venv/bin/python benchmarks/footprint.py [--model smollm2-135m-instruct] [--llamacpp benchmarks/.peers/build/
        llama.cpp/bin/llama-server] [--ctx 8192] [--slots 4] [--prompt-words 700] [--new-tokens 128]

Each server runs alone (one after another; memory does not depend on the machine's load the way time does), in
two configurations:
- defaults: `inferd serve --model M` and `llama-server -m FILE`, what a user gets without flags;
- matched: the same context and slots on both sides, `llama-server --ctx-size CTX --parallel SLOTS` (CTX tokens of KV
  shared by SLOTS slots) and `inferd serve --max-model-len CTX/SLOTS --max-num-seqs SLOTS --kv-cache-memory` sized
  to hold CTX tokens (bytes per token from the GGUF header: 2 x layers x KV heads x head size x 4 bytes, inferd's
  float32 KV; llama.cpp keeps its KV in float16 by default, half of that).
Figures per server (resident set of the process and its children, from /proc, in MiB): idle once ready; peak
while SLOTS concurrent completions run (distinct ~`--prompt-words` word prompts, `--new-tokens` greedy tokens,
twice over so every slot is reused); and idle again 5 s after the load. The KV bytes each side's configuration
reserves are printed beside them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_overhead import free_port, start_inferd, wait_until_healthy  # noqa: E402

MIB = 1024 * 1024


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of a process and all its descendants (VmRSS from /proc)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{current}/task/{current}/children", encoding="ascii") as f:
                pending.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


class PeakSampler:
    """Samples a process tree's RSS every 20 ms in a thread; `.peak_bytes` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))


def kv_bytes_per_token_float32(gguf_path: str) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def field(suffix: str) -> int:
        for name, f in reader.fields.items():
            if name.endswith(suffix):
                return int(f.parts[f.data[0]][0])
        raise KeyError(suffix)

    num_layers = field(".block_count")
    num_heads = field(".attention.head_count")
    num_kv_heads = field(".attention.head_count_kv")
    head_size = field(".embedding_length") // num_heads
    return 2 * num_layers * num_kv_heads * head_size * 4


def make_prompts(count: int, num_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ("river stone market window garden letter engine winter morning silver harbor lantern orchard "
             "meadow signal thunder candle forest valley bridge copper paper ocean mountain story").split()
    return [f"Document {i}: " + " ".join(rng.choice(words) for _ in range(num_words)) + "\nSummary:"
            for i in range(count)]


def run_load(base_url: str, model: str, prompts: list[str], new_tokens: int, slots: int) -> int:
    """All prompts through /v1/completions, `slots` at a time; -> completion tokens."""

    def one(prompt: str) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0}
        r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
        return sum(pool.map(one, prompts))


def start_llama_server(binary: str, gguf_path: str, flags: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [binary, "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port), "--no-webui", *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    wait_until_healthy(process, base_url, "llama-server", log_path, timeout_s=300)
    return process, base_url


def measure(name: str, process: subprocess.Popen, base_url: str, model: str, prompts: list[str],
            new_tokens: int, slots: int, settle_s: float) -> dict:
    time.sleep(settle_s)
    idle = tree_rss_bytes(process.pid)
    with PeakSampler(process.pid) as sampler:
        t0 = time.perf_counter()
        num_tokens = run_load(base_url, model, prompts, new_tokens, slots)
        load_s = time.perf_counter() - t0
    time.sleep(settle_s)
    after = tree_rss_bytes(process.pid)
    row = {"name": name, "idle": idle, "peak": sampler.peak_bytes, "after": after, "tokens": num_tokens,
           "load_s": load_s}
    print(f"  {name}: idle {idle / MIB:.0f} MiB, peak under load {sampler.peak_bytes / MIB:.0f} MiB, idle after "
          f"{after / MIB:.0f} MiB ({num_tokens} tokens in {load_s:.1f} s)", flush=True)
    return row


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--llamacpp", default="benchmarks/.peers/build/llama.cpp/bin/llama-server")
    ap.add_argument("--ctx", type=int, default=8192, help="KV tokens in the matched configuration (all slots)")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=700)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--servers", default="inferd,llamacpp", help="which of inferd, llamacpp to run")
    args = ap.parse_args()

    from inferd.kernels import cpu_flags_summary
    from inferd.store.pull import resolve_model

    gguf_path = str(resolve_model(args.model).path)
    kv_per_token = kv_bytes_per_token_float32(gguf_path)
    matched_kv_bytes = kv_per_token * args.ctx
    prompts = make_prompts(2 * args.slots, args.prompt_words, seed=0)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, flags {cpu_flags_summary()}; "
          f"model {args.model} ({gguf_path}, {os.path.getsize(gguf_path) / MIB:.0f} MiB); KV {kv_per_token} B/token "
          f"in float32; matched: {args.ctx} tokens, {args.slots} slots", flush=True)
    log_dir = tempfile.mkdtemp(prefix="footprint-")
    servers = set(args.servers.split(","))
    configs = []
    if "inferd" in servers:
        configs += [
            ("inferd serve (defaults)", "inferd", ["--model", args.model], "KV grows on demand to its default budget"),
            ("inferd serve (matched)", "inferd",
             ["--model", args.model, "--max-model-len", str(args.ctx // args.slots), "--max-num-seqs", str(args.slots),
              "--kv-cache-memory", str(matched_kv_bytes)],
             f"KV budget {matched_kv_bytes / MIB:.0f} MiB float32, paged in as used"),
        ]
    if "llamacpp" in servers:
        if not os.path.exists(args.llamacpp):
            raise SystemExit(f"no llama-server at {args.llamacpp}: run benchmarks/peers/setup_llamacpp.sh")
        configs += [
            ("llama-server (defaults)", "llamacpp", [], "its defaults (context from the model, auto slots)"),
            ("llama-server (matched)", "llamacpp", ["--ctx-size", str(args.ctx), "--parallel", str(args.slots)],
             f"KV {args.ctx} tokens float16 = {matched_kv_bytes / 2 / MIB:.0f} MiB allocated at start"),
        ]
    rows = []
    for name, kind, flags, note in configs:
        log_path = os.path.join(log_dir, name.split()[0] + ("-matched" if "matched" in name else "") + ".log")
        if kind == "inferd":
            process, base_url = start_inferd(flags, log_path)
        else:
            process, base_url = start_llama_server(args.llamacpp, gguf_path, flags, log_path)
        try:
            row = measure(name, process, base_url, args.model, prompts, args.new_tokens, args.slots, args.settle_s)
        finally:
            stop(process)
        row["note"] = note
        rows.append(row)
    print(f"\n(logs in {log_dir})\n")
    print("| server | idle MiB | peak under load MiB | idle after load MiB | KV |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['name']} | {row['idle'] / MIB:.0f} | {row['peak'] / MIB:.0f} | {row['after'] / MIB:.0f} | "
              f"{row['note']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
