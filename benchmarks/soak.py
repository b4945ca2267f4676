"""Soak: one `inferd serve` under hours of mixed traffic; RSS growth, latency drift and every status counted.

    python benchmarks/soak.py                                  # 1 hour, 16 streams, the default LLM
    python benchmarks/soak.py --duration-s 300 --window-s 60   # a 5-minute trial
    python benchmarks/soak.py --model smollm2-135m-instruct --model all-minilm-l6-v2   # embeddings mixed in

Workload: --concurrency closed-loop workers (default 16), each drawing its next request from a seeded mix:
    stream       streamed chat, 16-96 new tokens, temperature 0 / 0.7 / 1.0, top_p, seed: must end with a
                 finish_reason and [DONE]
    disconnect   streamed chat that the client drops after 1-5 chunks (the server must free its KV blocks)
    complete     non-streamed completion with a token budget, n = 1 or 2
    embed        /v1/embeddings of 1-8 texts (only when an embedding model is served)
    bad          one of the hostile bodies below: must get a 4xx and never hurt the others
Every answer is classed: ok, expected-4xx, a 4xx where a 200 was expected, any 5xx, a 2xx to a bad body,
a broken stream (no [DONE]) or a client-side timeout. The soak passes with zero of the last five.
The server process's RSS (VmRSS) and the load average are sampled every --sample-s seconds. Before the mix
starts, distinct long prefills touch every page of the calloc'd KV pool (see touch_kv_pool); RSS growth is
measured from the end of the warm-up (--warmup-s of the mix, which also fills the prefix cache and the
allocator's pools) to the end; latency percentiles (time to first token and end-to-end of `stream` requests) per window show the
drift. After the run: the server must be idle with no KV block in use and /health 200.
The peer is the same server earlier in the same run (the first window against the last): a soak compares a
process with itself over time. Writes a JSON record (--out) and prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_overhead import start_inferd  # noqa: E402
from offline import PROMPTS  # noqa: E402  the same chat prompts as the offline benchmark

KINDS = ("stream", "disconnect", "complete", "embed", "bad")
# Share of each kind in the mix (embed's share goes to stream when no embedding model is served).
MIX = {"stream": 0.62, "disconnect": 0.10, "complete": 0.10, "embed": 0.06, "bad": 0.12}
CLIENT_TIMEOUT_S = 300.0
FILL_PROMPT_TOKENS = 1024
FILL_MAX_REQUESTS = 400
FILL_FLAT_ROUNDS = 6  # rounds of 2 prefills with RSS growing less than FILL_FLAT_BYTES in all: the pool is touched
FILL_FLAT_BYTES = 4 * 2**20


def hostile_bodies(llm: str, embedder: str | None) -> list[tuple[str, str, str]]:
    """(name, path, raw body) of requests that must each get a 4xx: bad values at the edges of every type,
    unknown names, refused fields, unencodable text, malformed JSON, bodies that can never fit."""
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "Hello"}]

    def body(path: str, **fields: object) -> tuple[str, str]:
        return path, json.dumps({"model": llm, **fields})

    cases: list[tuple[str, tuple[str, str]]] = [
        ("negative temperature", body(chat, messages=user, temperature=-1)),
        ("top_p above 1", body(chat, messages=user, top_p=1.5)),
        ("top_k below -1", body(chat, messages=user, top_k=-5)),
        ("max_tokens beyond the context", body(chat, messages=user, max_tokens=10**9)),
        ("max_tokens zero", body(chat, messages=user, max_tokens=0)),
        ("n huge", body(chat, messages=user, n=10**6)),
        ("empty messages", body(chat, messages=[])),
        ("user content null", body(chat, messages=[{"role": "user", "content": None}])),
        ("unknown role", body(chat, messages=[{"role": "wizard", "content": "hi"}])),
        ("unknown model", (chat, json.dumps({"model": "no-such-model", "messages": user}))),
        ("logit_bias out of vocabulary", body(chat, messages=user, logit_bias={"99999999": 5})),
        ("frequency_penalty above 2", body(chat, messages=user, frequency_penalty=5)),
        ("seed beyond 64 bits", body(chat, messages=user, seed=2**70)),
        ("bad JSON schema", body(chat, messages=user, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})),
        ("prompt token id out of vocabulary", body("/v1/completions", prompt=[1, 2, 99999999], max_tokens=4)),
        ("prompt longer than the context", body("/v1/completions", prompt="word " * 20000, max_tokens=4)),
        ("lone surrogate", ("/v1/completions", '{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 4}' % llm)),
        ("malformed JSON", (chat, '{"model": "%s", "messages": [' % llm)),
        ("wrong type", body(chat, messages="not a list")),
        ("stream_options without stream", body(chat, messages=user, stream_options={"include_usage": True})),
        ("too many prompts", body("/v1/completions", prompt=["x"] * 5000, max_tokens=2)),
    ]
    if embedder is not None:
        cases += [
            ("embeddings on an LLM", ("/v1/embeddings", json.dumps({"model": llm, "input": "hi"}))),
            ("empty embedding input", ("/v1/embeddings", json.dumps({"model": embedder, "input": ""}))),
            ("chat on an embedding model", (chat, json.dumps({"model": embedder, "messages": user}))),
        ]
    return [(name, path, raw) for name, (path, raw) in cases]


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # per finished `stream` request: (finish time s since start, ttft s, e2e s, output chunks)
    stream_times: list[tuple[float, float, float, int]] = field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if outcome not in ("ok", "expected-4xx") and len(self.failures) < 50:
            self.failures.append(f"{outcome}: {detail}"[:300])


def classify_expected_ok(status: int, kind: str, text: str) -> str:
    if 200 <= status < 300:
        return "ok"
    if status >= 500:
        return "5xx"
    if status == 429:
        return "429"
    return "unexpected-4xx"


async def do_stream(client: httpx.AsyncClient, rng: random.Random, model: str, tally: Tally, start: float,
                    disconnect: bool) -> None:
    body = {"model": model, "stream": True, "max_tokens": rng.randint(16, 96),
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9]),
            "seed": rng.randrange(2**31)}  # fmt: skip
    kind = "disconnect" if disconnect else "stream"
    drop_after_chunks = rng.randint(1, 5)
    sent = time.monotonic()
    first_token_s = None
    num_chunks = 0
    saw_done = saw_finish = False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            tally.add(classify_expected_ok(response.status_code, kind, text), f"{kind} {response.status_code} {text}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                saw_done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                tally.add("stream-error", f"{kind} {data}")
                return
            choice = chunk["choices"][0] if chunk.get("choices") else None
            if choice is not None and choice.get("delta", {}).get("content"):
                num_chunks += 1
                if first_token_s is None:
                    first_token_s = time.monotonic() - sent
            if choice is not None and choice.get("finish_reason"):
                saw_finish = True
            if disconnect and num_chunks >= drop_after_chunks:
                tally.add("ok")  # leaving the block closes the connection mid-stream
                return
    if disconnect:  # finished before the drop point: a short answer
        tally.add("ok" if saw_done else "broken-stream", f"{kind} ended without [DONE]")
        return
    if not (saw_done and saw_finish):
        tally.add("broken-stream", f"stream done={saw_done} finish={saw_finish}")
        return
    tally.add("ok")
    end = time.monotonic()
    tally.stream_times.append((end - start, first_token_s if first_token_s is not None else end - sent, end - sent,
                               num_chunks))


async def do_complete(client: httpx.AsyncClient, rng: random.Random, model: str, tally: Tally) -> None:
    n = rng.choice([1, 1, 2])
    body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 48), "n": n,
            "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(2**31)}
    response = await client.post("/v1/completions", json=body)
    if response.status_code == 200:
        choices = response.json().get("choices", [])
        tally.add("ok" if len(choices) == n else "broken-answer", f"complete {len(choices)} choices for n={n}")
    else:
        tally.add(classify_expected_ok(response.status_code, "complete", response.text),
                  f"complete {response.status_code} {response.text}")


async def do_embed(client: httpx.AsyncClient, rng: random.Random, model: str, tally: Tally) -> None:
    texts = [rng.choice(PROMPTS)[: rng.randint(10, 400)] for _ in range(rng.randint(1, 8))]
    response = await client.post("/v1/embeddings", json={"model": model, "input": texts})
    if response.status_code == 200:
        data = response.json().get("data", [])
        tally.add("ok" if len(data) == len(texts) else "broken-answer", f"embed {len(data)} of {len(texts)}")
    else:
        tally.add(classify_expected_ok(response.status_code, "embed", response.text),
                  f"embed {response.status_code} {response.text}")


async def do_bad(client: httpx.AsyncClient, rng: random.Random, bodies: list[tuple[str, str, str]],
                 tally: Tally, bad_statuses: dict[str, set[int]]) -> None:
    name, path, raw = rng.choice(bodies)
    response = await client.post(path, content=raw.encode("utf-8", "surrogatepass"),
                                 headers={"content-type": "application/json"})
    bad_statuses.setdefault(name, set()).add(response.status_code)
    if 400 <= response.status_code < 500 and response.status_code != 429:
        tally.add("expected-4xx")
    elif response.status_code >= 500:
        tally.add("5xx", f"bad '{name}' {response.status_code} {response.text}")
    else:
        tally.add("bad-accepted", f"bad '{name}' {response.status_code} {response.text}")


async def worker(index: int, base_url: str, args: argparse.Namespace, llm: str, embedder: str | None,
                 bodies: list[tuple[str, str, str]], tally: Tally, bad_statuses: dict[str, set[int]],
                 start: float, deadline: float) -> None:
    rng = random.Random(args.seed * 1000 + index)
    weights = dict(MIX)
    if embedder is None:
        weights["stream"] += weights.pop("embed")
    kinds, kind_weights = list(weights), list(weights.values())
    # One connection pool per worker: disconnects close its connection, as a real client's would.
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, kind_weights)[0]
            try:
                if kind in ("stream", "disconnect"):
                    await do_stream(client, rng, llm, tally, start, disconnect=kind == "disconnect")
                elif kind == "complete":
                    await do_complete(client, rng, llm, tally)
                elif kind == "embed":
                    await do_embed(client, rng, embedder, tally)
                else:
                    await do_bad(client, rng, bodies, tally, bad_statuses)
            except httpx.TimeoutException as error:
                tally.add("timeout", f"{kind} {error!r}")
            except (httpx.TransportError, json.JSONDecodeError, KeyError) as error:
                tally.add("transport-error", f"{kind} {error!r}")


def rss_bytes(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


async def sampler(pid: int, start: float, deadline: float, period_s: float,
                  samples: list[tuple[float, int, float]]) -> None:
    while True:
        samples.append((time.monotonic() - start, rss_bytes(pid), os.getloadavg()[0]))
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(period_s)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def metric_value(metrics_text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
              if line.startswith(name) and not line.startswith("#")]  # fmt: skip
    return sum(values)


async def touch_kv_pool(base_url: str, pid: int, llm: str, seed: int) -> tuple[int, int]:
    """Prefill distinct long prompts until the server's RSS stops growing; returns (requests, RSS bytes).

    The KV pool is calloc'd, so its pages join the RSS only when a block is first written, and the allocator hands
    out never-used blocks before reusing cached ones: without this, RSS climbs for the first ~15 minutes of
    traffic as the pool is touched, which is not a leak. Random token ids make every prompt's blocks new."""
    rng = random.Random(seed)
    num_requests = 0
    history = [rss_bytes(pid)]
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client:

        async def one() -> None:
            prompt = [rng.randrange(1000, 20000) for _ in range(FILL_PROMPT_TOKENS)]
            response = await client.post("/v1/completions", json={"model": llm, "prompt": prompt, "max_tokens": 1})
            response.raise_for_status()

        while num_requests < FILL_MAX_REQUESTS:
            await asyncio.gather(one(), one())
            num_requests += 2
            history.append(rss_bytes(pid))
            if len(history) > FILL_FLAT_ROUNDS and history[-1] - history[-1 - FILL_FLAT_ROUNDS] < FILL_FLAT_BYTES:
                break
    return num_requests, history[-1]


async def run(args: argparse.Namespace, base_url: str, pid: int, llm: str, embedder: str | None) -> dict:
    rss_start = rss_bytes(pid)
    fill_requests, rss_filled = await touch_kv_pool(base_url, pid, llm, args.seed)
    print(f"KV pool touched: {fill_requests} prefills of {FILL_PROMPT_TOKENS} tokens, RSS {rss_start / 2**20:.0f} -> "
          f"{rss_filled / 2**20:.0f} MiB", flush=True)
    bodies = hostile_bodies(llm, embedder)
    tally = Tally()
    bad_statuses: dict[str, set[int]] = {}
    samples: list[tuple[float, int, float]] = []
    start = time.monotonic()
    deadline = start + args.duration_s
    await asyncio.gather(
        sampler(pid, start, deadline, args.sample_s, samples),
        *(worker(i, base_url, args, llm, embedder, bodies, tally, bad_statuses, start, deadline)
          for i in range(args.concurrency)),
    )  # fmt: skip
    elapsed_s = time.monotonic() - start
    samples.append((elapsed_s, rss_bytes(pid), os.getloadavg()[0]))

    # Afterwards: idle, nothing held. Give the engine a moment to notice the last disconnects.
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for _ in range(60):
            metrics_text = (await client.get("/metrics")).text
            running = metric_value(metrics_text, "inferd:num_requests_running")
            waiting = metric_value(metrics_text, "inferd:num_requests_waiting")
            kv_usage = metric_value(metrics_text, "inferd:kv_cache_usage_ratio")
            if running == 0 and waiting == 0 and kv_usage == 0:
                break
            await asyncio.sleep(1)
        health_status = (await client.get("/health")).status_code

    windows = []
    num_windows = max(1, round(args.duration_s / args.window_s))
    for w in range(num_windows):
        lo, hi = w * args.window_s, (w + 1) * args.window_s
        rows = [row for row in tally.stream_times if lo <= row[0] < hi]
        window_samples = [s for s in samples if lo <= s[0] < hi] or samples[-1:]
        windows.append({
            "window": f"{lo / 60:.0f}-{hi / 60:.0f} min",
            "streams": len(rows),
            "ttft_p50_ms": 1000 * percentile([r[1] for r in rows], 0.5),
            "ttft_p99_ms": 1000 * percentile([r[1] for r in rows], 0.99),
            "e2e_p50_ms": 1000 * percentile([r[2] for r in rows], 0.5),
            "e2e_p99_ms": 1000 * percentile([r[2] for r in rows], 0.99),
            "rss_mib_end": window_samples[-1][1] / 2**20,
            "load_avg_mean": statistics.fmean(s[2] for s in window_samples),
        })  # fmt: skip
    warm_samples = [s for s in samples if s[0] >= args.warmup_s] or samples
    rss_warm = warm_samples[0][1]
    rss_end = samples[-1][1]
    failures = {k: v for k, v in tally.counts.items() if k not in ("ok", "expected-4xx")}
    first, last = windows[0], windows[-1]
    return {
        "duration_s": elapsed_s,
        "concurrency": args.concurrency,
        "counts": tally.counts,
        "failures": failures,
        "failure_examples": tally.failures,
        "bad_statuses": {name: sorted(statuses) for name, statuses in bad_statuses.items()},
        "rss_mib_at_start": rss_start / 2**20,
        "kv_fill_requests": fill_requests,
        "rss_mib_after_kv_fill": rss_filled / 2**20,
        "rss_mib_after_warmup": rss_warm / 2**20,
        "rss_mib_end": rss_end / 2**20,
        "rss_mib_max": max(s[1] for s in samples) / 2**20,
        "rss_growth_pct": 100 * (rss_end - rss_warm) / rss_warm,
        "ttft_p99_drift": last["ttft_p99_ms"] / first["ttft_p99_ms"],
        "e2e_p99_drift": last["e2e_p99_ms"] / first["e2e_p99_ms"],
        "after": {"running": running, "waiting": waiting, "kv_cache_usage_ratio": kv_usage, "health": health_status},
        "windows": windows,
        "rss_samples": samples,
    }


def print_markdown(result: dict) -> None:
    counts = result["counts"]
    print(f"\nrequests: {sum(counts.values())} in {result['duration_s'] / 60:.1f} min at {result['concurrency']} "
          f"workers; outcomes: {json.dumps(counts, sort_keys=True)}")
    print(f"failures (must be none): {json.dumps(result['failures'])}")
    for example in result["failure_examples"][:10]:
        print(f"  {example}")
    print(f"RSS: {result['rss_mib_at_start']:.0f} MiB healthy, {result['rss_mib_after_kv_fill']:.0f} MiB after touching "
          f"the KV pool ({result['kv_fill_requests']} prefills)")
    print(f"RSS: {result['rss_mib_after_warmup']:.0f} MiB after warm-up -> {result['rss_mib_end']:.0f} MiB at the end "
          f"({result['rss_growth_pct']:+.2f}%), max {result['rss_mib_max']:.0f} MiB")
    print(f"p99 drift, last window / first: TTFT {result['ttft_p99_drift']:.2f}x, e2e {result['e2e_p99_drift']:.2f}x")
    print(f"after the run: {json.dumps(result['after'])}\n")
    print("| window | streams done | TTFT p50 / p99 ms | e2e p50 / p99 ms | RSS MiB (end) | load avg |")
    print("|---|---|---|---|---|---|")
    for w in result["windows"]:
        print(f"| {w['window']} | {w['streams']} | {w['ttft_p50_ms']:.0f} / {w['ttft_p99_ms']:.0f} | "
              f"{w['e2e_p50_ms']:.0f} / {w['e2e_p99_ms']:.0f} | {w['rss_mib_end']:.0f} | {w['load_avg_mean']:.1f} |")
    print("\nhostile bodies and the statuses they got:")
    for name, statuses in sorted(result["bad_statuses"].items()):
        print(f"  {name}: {statuses}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="repeatable; the first LLM is the chat target "
                        "(default: smollm2-135m-instruct)")
    parser.add_argument("--embedding-model", help="which --model is the embedding model (default: "
                        "all-minilm-l6-v2 if given)")
    parser.add_argument("--duration-s", type=float, default=3600)
    parser.add_argument("--window-s", type=float, default=600)
    parser.add_argument("--warmup-s", type=float, default=120)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `inferd serve` flag (repeatable)")
    parser.add_argument("--out", default="soak.json")
    args = parser.parse_args()

    models = args.model or ["smollm2-135m-instruct"]
    embedder = args.embedding_model or ("all-minilm-l6-v2" if "all-minilm-l6-v2" in models else None)
    llm = next(model for model in models if model != embedder)
    log_path = os.path.join(tempfile.gettempdir(), f"inferd-soak-{os.getpid()}.log")
    model_flags = [flag for model in models for flag in ("--model", model)]
    process, base_url = start_inferd([*model_flags, *args.server_arg], log_path)
    print(f"server {base_url} pid {process.pid}, log {log_path}; {args.duration_s:.0f} s at {args.concurrency} workers",
          flush=True)
    try:
        result = asyncio.run(run(args, base_url, process.pid, llm, embedder))
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    log_text = Path(log_path).read_text(errors="replace")
    result["server_tracebacks"] = log_text.count("Traceback")
    result["server_exit_status"] = process.returncode
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_markdown(result)
    print(f"server log: {result['server_tracebacks']} tracebacks; exit status {process.returncode}")
    passed = not result["failures"] and result["rss_growth_pct"] < 5 and result["after"]["kv_cache_usage_ratio"] == 0 \
        and result["after"]["health"] == 200 and result["server_tracebacks"] == 0
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
