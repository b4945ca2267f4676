"""Embedding speed: inferd vs sentence-transformers in-process, and inferd serve vs embedding servers over HTTP,
same model (all-MiniLM-L6-v2 from the store), same seeded sentences, same machine, one run.

    .venv/bin/python benchmarks/embeddings.py offline [--num-sentences 2000] [--num-batch1 300] [--rounds 2]
        [--threads N] [--int8] [--nn-linear]   # + the int8 encoder, + the nn.Linear (torch BLAS) ablation
    .venv/bin/python benchmarks/embeddings.py http [--servers inferd,inferd-1thread,inferd-int8,fastapi-st,infinity,
        litserve,litserve-nobatch] [--rounds 2] [--wrk-scenarios '1/req c=32'] [--wrk-seconds 10]
        # inferd-<N>thread(s): the num_threads option N
    .venv/bin/python benchmarks/embeddings.py attention   # attention: per sequence vs per length bucket vs one call
    .venv/bin/python benchmarks/embeddings.py mixed [--no-cpu-share] [--client wrk]   # an LLM stream beside embeddings
    .venv/bin/python benchmarks/embeddings.py hotpath [--rounds 4]   # /v1/embeddings: bare ASGI hot path vs FastAPI route

offline: `Embedder.embed` (packed batches) vs `SentenceTransformer.encode` at batch 32 and batch 1, the same torch
thread count, runs alternating, medians of `--rounds`. Prints achieved GFLOP/s (useful FLOPs: the encoder's
linear layers and attention on the real token counts, no padding) beside a float32 GEMM rate measured in the same
run, and the lowest cosine between the two sides' vectors.

http: closed-loop clients POST OpenAI `/embeddings` bodies: 1 sentence per request at concurrency 1/8/32, and
32 per request at concurrency 4. Servers: `inferd serve`, a FastAPI + sentence-transformers server written by
hand (peers/embed_fastapi_st.py), Infinity and LitServe (peers/embed_litserve.py: batching 32 / 5 ms for 1 per
request, a second server without batching for 32 per request, which LitServe cannot batch); peers/setup_embed_peers.sh makes their venvs; a
server whose venv is missing is reported and skipped). All servers run at once; scenarios alternate between
them per round, so slow drifts of this shared machine hit every server alike. The client is Python (httpx, one
asyncio loop); `--wrk-scenarios` runs the named scenarios a second time with wrk (C; peers/embed_wrk.lua cycles
through the same bodies) against every server, for `--wrk-seconds` each: on a 2-core machine the Python client's
~1 ms of CPU per request is CPU the server does not get. Every server's vectors are checked
against sentence-transformers (lowest cosine printed). Each round also measures inferd in process in the client
(`--offline-threads`, while every server is idle), the reference for the issue's "% of our own offline rate".

mixed: one greedy chat stream of the LLM alone, then beside 1-per-request embedding traffic at c=8, on one
`inferd serve` holding both; prints what each keeps and each thread group's share of the machine's CPU time while
both ran (read from /proc per thread; the embedding worker process counts as the embedding workers; wrk's own CPU
is printed apart and not counted). A round where the LLM beside the embeddings ran > 1.5x faster than alone (the
lone LLM's OpenMP team collapsed on a loaded machine) is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "all-minilm-l6-v2"
PEERS_DIR = Path(os.environ.get("PEERS_DIR", REPO_ROOT / "benchmarks" / ".peers"))

# Common English words; sentences are seeded draws of 5-60 of them.
_WORDS = (
    "the be to of and a in that have it for not on with he as you do at this but his by from they we say her she "
    "or an will my one all would there their what so up out if about who get which go me when make can like time "
    "no just him know take people into year your good some could them see other than then now look only come its "
    "over think also back after use two how our work first well way even new want because any these give day most "
    "us model server search price order customer fraud score vector similar item music film travel bank payment "
    "delivery weather football recipe garden doctor school market river mountain city computer network language"
).split()


def make_sentences(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 60))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return out


def model_dir() -> Path:
    sys.path.insert(0, str(REPO_ROOT))
    from inferd.store import resolve_model

    return Path(resolve_model(MODEL_NAME).path)


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return "?"
    keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return " ".join(f for f in keep if f in flags)


def machine_line() -> str:
    import torch

    model = "?"
    try:
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name")).split(":")[1].strip()
    except (OSError, StopIteration):
        pass
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {model}, {os.cpu_count()} cores, flags {cpu_flags()}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; python {platform.python_version()}"
    )


def matmul_gflops(repeats: int = 7) -> tuple[float, float, float]:
    """float32 GEMM GFLOP/s, medians: torch's matmul (MKL) at 1024^3 and at the encoder's FFN shape [1024 tokens,
    384] x [384, 1536], and oneDNN's prepacked linear at the FFN shape (the kernel inferd's encoder runs; MKL does
    not take its AVX-512 path on AMD CPUs, so its rate understates the machine)."""
    import torch

    def rate(fn, flops: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            times.append((time.perf_counter() - t0) / 5)
        return flops / statistics.median(times) / 1e9

    rates = []
    for m, k, n in ((1024, 1024, 1024), (1024, 384, 1536)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(rate(lambda: a @ b, 2 * m * k * n))
    x, w = torch.randn(1024, 384), torch.randn(1536, 384)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
    rates.append(rate(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 2 * 1024 * 384 * 1536))
    return rates[0], rates[1], rates[2]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine in float64 (in float32 the arithmetic alone is off by ~6e-8)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------------------------------------------- offline


def run_offline(args: argparse.Namespace) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from inferd.embeddings import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_dir()
    sentences = make_sentences(args.num_sentences)
    batch1 = sentences[: args.num_batch1]
    embedder = Embedder(path, device="cpu", dtype="float32", max_batch_items=32)
    st_model = SentenceTransformer(str(path), device="cpu")
    variants = {}  # extra inferd rows: the int8 path and the nn.Linear (torch's BLAS) ablation
    if args.int8:
        variants["inferd int8"] = Embedder(path, device="cpu", dtype="float32", max_batch_items=32, quantization="int8")
    if args.nn_linear:
        from inferd.embeddings.model import EmbeddingModel
        from inferd.models.bert import load_bert_encoder

        plain = Embedder(path, device="cpu", dtype="float32", max_batch_items=32)
        plain.model = EmbeddingModel(load_bert_encoder(path, onednn=False), plain.model.tokenizer, plain.model.pooling)
        variants["inferd nn.Linear"] = plain
    lengths = [len(ids) for ids in embedder.model.tokenizer.encode_batch(sentences, truncate=True)]
    flops_all = embedder.model.flops(lengths)
    flops_b1 = embedder.model.flops(lengths[: args.num_batch1])
    print(f"# {machine_line()}")
    print(f"# {len(sentences)} sentences, {sum(lengths)} tokens (mean {statistics.mean(lengths):.1f}, max {max(lengths)}); "
          f"batch 1 on the first {len(batch1)}")

    def ours_32() -> np.ndarray:
        return np.concatenate([embedder.embed(sentences[i : i + 32]) for i in range(0, len(sentences), 32)])

    def st_32() -> np.ndarray:
        return st_model.encode(sentences, batch_size=32, convert_to_numpy=True)

    def ours_1() -> None:
        for s in batch1:
            embedder.embed([s])

    def st_1() -> None:
        for s in batch1:
            st_model.encode([s], batch_size=1, convert_to_numpy=True)

    runs = {"inferd batch 32": (ours_32, len(sentences), flops_all), "sentence-transformers batch 32": (st_32, len(sentences), flops_all),
            "inferd batch 1": (ours_1, len(batch1), flops_b1), "sentence-transformers batch 1": (st_1, len(batch1), flops_b1)}

    def variant_runs(name: str, variant) -> dict:
        def b32() -> np.ndarray:
            return np.concatenate([variant.embed(sentences[i : i + 32]) for i in range(0, len(sentences), 32)])

        def b1() -> None:
            for s in batch1:
                variant.embed([s])

        return {f"{name} batch 32": (b32, len(sentences), flops_all), f"{name} batch 1": (b1, len(batch1), flops_b1)}

    for name, variant in variants.items():
        runs.update(variant_runs(name, variant))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    ours_vectors = ours_32()  # warm-up and the vectors to compare
    ref_vectors = st_32()
    min_cos = float(cosines(ours_vectors, ref_vectors).min())
    for name in variants:
        variant_cos = float(cosines(runs[f"{name} batch 32"][0](), ref_vectors).min())  # also its warm-up
        print(f"# {name}: lowest cosine vs sentence-transformers {variant_cos:.8f}")
    gemm_rates: list[tuple[float, float]] = []
    for round_index in range(args.rounds):
        gemm_rates.append(matmul_gflops(repeats=3))  # measured every round: the machine's rate drifts
        for name, (fn, num, _flops) in runs.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(num / (time.perf_counter() - t0))
        print(f"# round {round_index + 1}: " + ", ".join(f"{n} {r[-1]:.1f}/s" for n, r in rates.items()), flush=True)
    gemm_big = statistics.median(r[0] for r in gemm_rates)
    gemm_mkl_ffn = statistics.median(r[1] for r in gemm_rates)
    gemm_onednn_ffn = statistics.median(r[2] for r in gemm_rates)
    gemm_ffn = max(gemm_mkl_ffn, gemm_onednn_ffn)
    print(f"# float32 GEMM (median of the rounds): torch matmul (MKL) {gemm_big:.0f} GFLOP/s at 1024^3, {gemm_mkl_ffn:.0f} "
          f"at the FFN shape [1024,384]x[384,1536]; oneDNN prepacked linear {gemm_onednn_ffn:.0f} at the FFN shape")
    print()
    print("| in-process | sentences/s (median) | rounds | GFLOP/s achieved | vs the best float32 GEMM at FFN shape |")
    print("|---|---|---|---|---|")
    for name, (_fn, num, flops) in runs.items():
        median = statistics.median(rates[name])
        gflops = median * flops / num / 1e9
        print(f"| {name} | {median:.1f} | {', '.join(f'{r:.1f}' for r in rates[name])} | {gflops:.1f} | {gflops / gemm_ffn:.0%} |")
    b32 = statistics.median(rates["inferd batch 32"]) / statistics.median(rates["sentence-transformers batch 32"])
    b1 = statistics.median(rates["inferd batch 1"]) / statistics.median(rates["sentence-transformers batch 1"])
    print(f"\ninferd / sentence-transformers: batch 32 {b32:.2f}x, batch 1 {b1:.2f}x; lowest cosine {min_cos:.8f}")


# ---------------------------------------------------------------------------------------------------- attention


def run_attention(args: argparse.Namespace) -> None:
    """One encoder layer's attention for batches of 32 seeded sentences (all-MiniLM-L6-v2: 12 heads x 32), three
    ways: one SDPA call per sequence on its packed rows; one masked call per length bucket (sequences padded to
    their own length rounded up to 16); inferd's EncoderLayer.attention (one gather into slots of the longest
    length, one masked call, one gather back)."""
    import torch
    import torch.nn.functional as F

    from inferd.embeddings import Embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    embedder = Embedder(model_dir(), device="cpu", dtype="float32")
    encoder = embedder.model.encoder
    layer = encoder.layers[0]
    token_id_lists = embedder.model.tokenizer.encode_batch(make_sentences(32 * 8), truncate=True)
    heads, head_dim = layer.num_heads, layer.head_dim

    def per_sequence(qkv: torch.Tensor, batch) -> None:
        x = qkv.permute(1, 2, 0, 3)  # [3, heads, T, head_dim]
        for s, e in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:]):
            F.scaled_dot_product_attention(x[0, :, s:e], x[1, :, s:e], x[2, :, s:e])

    def bucket_plan(batch) -> list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per length bucket (built before the timing, as a model would at packing time): (num_seqs, slot length,
        gather rows, key mask, destination rows, source slots)."""
        cu = batch.cu_seqlens
        buckets: dict[int, list[int]] = {}
        for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
            buckets.setdefault(-(-(e - s) // 16) * 16, []).append(i)
        plan = []
        for p, seqs in buckets.items():
            gather, mask, dst, src = [], [], [], []
            for slot, i in enumerate(seqs):
                s, n = cu[i], cu[i + 1] - cu[i]
                gather += list(range(s, s + n)) + [s] * (p - n)
                mask.append([True] * n + [False] * (p - n))
                dst += list(range(s, s + n))
                src += list(range(slot * p, slot * p + n))
            plan.append((len(seqs), p, torch.tensor(gather), torch.tensor(mask).view(len(seqs), 1, 1, p),
                         torch.tensor(dst), torch.tensor(src)))
        return plan

    def per_bucket(qkv: torch.Tensor, batch) -> torch.Tensor:
        context = qkv.new_zeros(qkv.shape[0], heads * head_dim)
        for g, p, gather, mask, dst, src in plans[id(batch)]:
            x = qkv.index_select(0, gather).view(g, p, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=mask).transpose(1, 2).reshape(g * p, -1)
            context.index_copy_(0, dst, out.index_select(0, src))
        return context

    plans: dict[int, list] = {}
    ways = {"one call per sequence": per_sequence, "one call per length bucket": per_bucket,
            "one call, slots of the longest length (inferd)": layer.attention}
    timings: dict[str, list[float]] = {name: [] for name in ways}
    with torch.inference_mode():
        for _round in range(args.rounds):
            for b in range(0, len(token_id_lists), 32):
                batch = encoder.pack(token_id_lists[b : b + 32])
                plans[id(batch)] = bucket_plan(batch)
                qkv = torch.randn(batch.input_ids.shape[0], 3, heads, head_dim)
                for name, fn in ways.items():
                    t0 = time.perf_counter()
                    fn(qkv, batch)
                    timings[name].append(time.perf_counter() - t0)
    print(f"# {machine_line()}")
    print("| attention of one layer, batch of 32 sentences | median ms | rounds x batches |")
    print("|---|---|---|")
    for name, ts in timings.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {len(ts)} |")


# ---------------------------------------------------------------------------------------------------- http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str  # the embeddings endpoint
    model: str  # the body's model field
    max_per_request: int | None = None  # scenarios with more inputs per request skip this server
    process: subprocess.Popen | None = None
    log_path: str = ""


def _python_of(peer: str) -> Path | None:
    python = PEERS_DIR / f"{peer}-venv" / "bin" / "python"
    return python if python.exists() else None


def start_servers(names: list[str], path: Path, args_inferd: list[str], num_threads: int = 0) -> list[Server]:
    servers = []
    for name in names:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
        if name == "inferd" or name.startswith(("inferd-", "inferd+")):
            # the response cache off: every round must reach the model, as it does on the peers
            cmd = [sys.executable, "-m", "inferd.cli", "serve", "--port", str(port), "--response-cache-bytes", "0",
                   *args_inferd]
            # inferd-<N>thread(s): the model's num_threads option N; inferd-int8: quantization int8
            options = {}
            if "+" in name:  # inferd+KEY=VALUE+...: the embedding model's options from a models file
                for option in name.split("+")[1:]:
                    key, _, value = option.partition("=")
                    options[key] = value
            elif name.endswith(("thread", "threads")):
                options["num_threads"] = int(name.split("-", 1)[1].split("thread")[0])
            elif name == "inferd-int8":
                options["quantization"] = "int8"
            elif name != "inferd" and "+" not in name:
                raise SystemExit(f"unknown server {name!r}")
            if num_threads and "num_threads" not in options:
                options["num_threads"] = num_threads
            if options:  # per-model options come from a models file
                models_file = tempfile.NamedTemporaryFile("w", prefix="embed-bench-models-", suffix=".yaml", delete=False)
                rendered = ", ".join(f"{k}: {v}" for k, v in options.items())
                models_file.write(f"models:\n  - source: {MODEL_NAME}\n    options: {{{rendered}}}\n")
                models_file.close()
                cmd += ["--models-file", models_file.name]
            else:
                cmd += ["--model", MODEL_NAME]
            server = Server(name, f"http://127.0.0.1:{port}/v1/embeddings", MODEL_NAME)
        elif name == "fastapi-st":
            cmd = [sys.executable, str(REPO_ROOT / "benchmarks/peers/embed_fastapi_st.py"), str(path), "--port", str(port)]
            server = Server(name, f"http://127.0.0.1:{port}/v1/embeddings", MODEL_NAME)
        elif name == "infinity":
            python = _python_of("infinity")
            if python is None:
                print(f"# {name}: skipped, no venv at {PEERS_DIR / 'infinity-venv'} (run benchmarks/peers/setup_embed_peers.sh)")
                continue
            cmd = [str(python.parent / "infinity_emb"), "v2", "--model-id", str(path), "--served-model-name", MODEL_NAME,
                   "--port", str(port), "--engine", "torch", "--device", "cpu", "--no-bettertransformer",
                   "--batch-size", "32"]
            server = Server(name, f"http://127.0.0.1:{port}/embeddings", MODEL_NAME)
        elif name in ("litserve", "litserve-nobatch"):
            python = _python_of("litserve")
            if python is None:
                print(f"# {name}: skipped, no venv at {PEERS_DIR / 'litserve-venv'} (run benchmarks/peers/setup_embed_peers.sh)")
                continue
            # LitServe batches only single-input requests: batching 32 / 5 ms for 1 per request, none for 32
            batch_args = ["--max-batch-size", "32", "--batch-timeout", "0.005"] if name == "litserve" else ["--max-batch-size", "1"]
            cmd = [str(python), str(REPO_ROOT / "benchmarks/peers/embed_litserve.py"), str(path), "--port", str(port), *batch_args]
            server = Server(name, f"http://127.0.0.1:{port}/v1/embeddings", MODEL_NAME,
                            max_per_request=1 if name == "litserve" else None)
        else:
            raise SystemExit(f"unknown server {name!r}")
        log = tempfile.NamedTemporaryFile("w", prefix=f"embed-bench-{name}-", suffix=".log", delete=False)
        server.log_path = log.name
        # own process group: LitServe's worker processes must stop with their server
        server.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                          start_new_session=True)
        servers.append(server)
    return servers


def wait_ready(servers: list[Server], timeout_s: float = 300.0) -> list[Server]:
    import httpx

    ready = []
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending and time.monotonic() < deadline:
        for server in list(pending):
            if server.process is not None and server.process.poll() is not None:
                print(f"# {server.name}: exited with {server.process.returncode}; log {server.log_path}")
                pending.remove(server)
                continue
            try:
                r = httpx.post(server.url, json={"model": server.model, "input": ["ready?"]}, timeout=10)
                if r.status_code == 200:
                    ready.append(server)
                    pending.remove(server)
            except httpx.HTTPError:
                pass
        time.sleep(1.0)
    for server in pending:
        print(f"# {server.name}: not ready after {timeout_s:.0f}s; log {server.log_path}")
    return ready


def stop_servers(servers: list[Server]) -> None:
    """SIGTERM to each server's process group (the server and any workers it spawned), SIGKILL after 15 s."""
    import signal

    def signal_group(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    for server in servers:
        if server.process is not None:
            signal_group(server.process, signal.SIGTERM)
    for server in servers:
        if server.process is not None:
            try:
                server.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
            signal_group(server.process, signal.SIGKILL)


def decode_embeddings(body: dict) -> np.ndarray:
    import base64

    rows = sorted(body["data"], key=lambda d: d["index"])
    out = []
    for d in rows:
        e = d["embedding"]
        out.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.asarray(e, dtype=np.float32))
    return np.stack(out)


async def closed_loop(url: str, model: str, bodies: list[list[str]], concurrency: int) -> tuple[float, float, int]:
    """(sentences/s, p50 latency ms, errors): `concurrency` clients, each sends its next body when its last answer
    arrived, until every body was sent."""
    import httpx

    latencies: list[float] = []
    errors = 0
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def worker() -> None:
            nonlocal errors
            while queue:
                texts = queue.pop()
                t0 = time.perf_counter()
                r = await client.post(url, json={"model": model, "input": texts})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return sum(len(b) for b in bodies) / wall, statistics.median(latencies) * 1e3, errors


WRK_SCRIPT = REPO_ROOT / "benchmarks" / "peers" / "embed_wrk.lua"


def start_wrk(url: str, model: str, bodies: list[list[str]], concurrency: int, seconds: float,
              content_type: str = "application/json") -> subprocess.Popen:
    """wrk (C, one thread, `concurrency` connections) posting the bodies (cycling) for `seconds`, closed loop:
    each connection sends its next body when its last answer arrived. SIGINT ends it early (it still reports)."""
    import shutil

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk), or leave out the wrk options")
    with tempfile.NamedTemporaryFile("w", prefix="embed-wrk-bodies-", suffix=".jsonl", delete=False) as f:
        for texts in bodies:
            f.write(json.dumps({"model": model, "input": texts}) + "\n")
    process = subprocess.Popen([wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
                                "--latency", "-s", str(WRK_SCRIPT), url, "--", f.name, content_type],
                               stdout=subprocess.PIPE, text=True)
    process.bodies_path = f.name  # type: ignore[attr-defined]
    process.per_request = len(bodies[0])  # type: ignore[attr-defined]
    return process


def wrk_result(process: subprocess.Popen) -> tuple[float, float, int]:
    """(sentences/s, p50 latency ms, errors) of a wrk run started by start_wrk, once it ends."""
    import re

    out, _ = process.communicate()
    os.unlink(process.bodies_path)  # type: ignore[attr-defined]
    units_ms = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    p50 = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s|m)\s*$", out, flags=re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, flags=re.M)
    if p50 is None or rate is None:
        raise RuntimeError(f"cannot read wrk's output (exit status {process.returncode}):\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(int(g) for g in socket_errors.groups()) if socket_errors else 0)
    return float(rate.group(1)) * process.per_request, float(p50.group(1)) * units_ms[p50.group(2)], errors  # type: ignore[attr-defined]


def wrk_closed_loop(url: str, model: str, bodies: list[list[str]], concurrency: int, seconds: float,
                    content_type: str = "application/json") -> tuple[float, float, int]:
    """As closed_loop, with wrk as the client for `seconds`. A Python client spends ~1 ms of CPU per request on
    this same 2-core machine, which the server then lacks; wrk a few µs."""
    return wrk_result(start_wrk(url, model, bodies, concurrency, seconds, content_type))


def run_http(args: argparse.Namespace) -> None:
    import httpx
    from sentence_transformers import SentenceTransformer

    path = model_dir()
    sentences = make_sentences(args.num_sentences)
    scenarios = [("1/req c=1", 1, 1, args.num_c1), ("1/req c=8", 1, 8, args.num_sentences),
                 ("1/req c=32", 1, 32, args.num_sentences), ("32/req c=4", 32, 4, args.num_sentences)]
    # The same scenarios again with wrk as the client (every server, so the comparison stays fair)
    known = {label: (per_request, concurrency, num) for label, per_request, concurrency, num in scenarios}
    for label in filter(None, (x.strip() for x in args.wrk_scenarios.split(","))):
        if label not in known:
            raise SystemExit(f"--wrk-scenarios: unknown scenario {label!r}; known: {list(known)}")
        scenarios.append((f"{label} wrk", *known[label]))
    servers = start_servers(args.servers.split(","), path, args.inferd_args.split(), args.inferd_num_threads)
    try:
        servers = wait_ready(servers)
        st_model = SentenceTransformer(str(path), device="cpu")
        check = sentences[:64]
        ref = st_model.encode(check, convert_to_numpy=True)
        del st_model
        print(f"# {machine_line()}")
        min_cos = {}
        for server in servers:
            step = server.max_per_request or 16
            vectors = np.concatenate([decode_embeddings(httpx.post(server.url, json={"model": server.model, "input": check[i : i + step]}, timeout=120).json())
                                      for i in range(0, len(check), step)])
            min_cos[server.name] = float(cosines(vectors, ref).min())
            print(f"# {server.name}: lowest cosine vs sentence-transformers on {len(check)} sentences {min_cos[server.name]:.8f}")
        results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        offline_rates: dict[str, list[float]] = {}
        offline = None
        if args.offline_threads:
            import torch

            from inferd.embeddings import Embedder

            offline = Embedder(path, device="cpu", dtype="float32", max_batch_items=32)
            offline_ids = offline.model.tokenizer.encode_batch(sentences, truncate=True)
            offline.embed_token_ids(offline_ids[:64])  # warm-up
        for round_index in range(args.rounds):
            if offline is not None:  # our own in-process rate, while every server is idle, this round
                for num_threads in (int(n) for n in args.offline_threads.split(",")):
                    torch.set_num_threads(num_threads)
                    for label, batch_size in ((f"offline batch 32, {num_threads} thread(s)", 32),
                                              (f"offline batch 1, {num_threads} thread(s)", 1)):
                        num = len(offline_ids) if batch_size == 32 else args.num_c1
                        t0 = time.perf_counter()
                        for i in range(0, num, batch_size):
                            offline.embed_token_ids(offline_ids[i : i + batch_size])
                        offline_rates.setdefault(label, []).append(num / (time.perf_counter() - t0))
                        print(f"# round {round_index + 1} inferd {label}: {offline_rates[label][-1]:.1f} sentences/s", flush=True)
            for label, per_request, concurrency, num in scenarios:
                bodies = [sentences[i : i + per_request] for i in range(0, num, per_request)]
                for server in servers:
                    if server.max_per_request is not None and per_request > server.max_per_request:
                        continue
                    asyncio.run(closed_loop(server.url, server.model, bodies[: max(concurrency, 4)], concurrency))  # warm
                    if label.endswith(" wrk"):
                        result = wrk_closed_loop(server.url, server.model, bodies, concurrency, args.wrk_seconds)
                    else:
                        result = asyncio.run(closed_loop(server.url, server.model, bodies, concurrency))
                    results.setdefault((server.name, label), []).append(result)
                    print(f"# round {round_index + 1} {label} {server.name}: {result[0]:.1f} sentences/s, p50 {result[1]:.1f} ms"
                          + (f", {result[2]} errors" if result[2] else ""), flush=True)
        print()
        print("| sentences/s (p50 ms) | " + " | ".join(s[0] for s in scenarios) + " | lowest cosine |")
        print("|---|" + "---|" * (len(scenarios) + 1))
        for server in servers:
            cells = []
            for label, *_ in scenarios:
                runs = results.get((server.name, label))
                if not runs:
                    cells.append("-")
                    continue
                rate = statistics.median(r[0] for r in runs)
                p50 = statistics.median(r[1] for r in runs)
                errs = sum(r[2] for r in runs)
                cells.append(f"{rate:.1f} ({p50:.0f})" + (f" {errs} err" if errs else ""))
            print(f"| {server.name} | " + " | ".join(cells) + f" | {min_cos[server.name]:.8f} |")
        if offline_rates:
            print()
            for label, rates in offline_rates.items():
                print(f"inferd in process (client side, servers idle), {label}: {statistics.median(rates):.1f} sentences/s "
                      f"(rounds {', '.join(f'{r:.1f}' for r in rates)})")
    finally:
        stop_servers(servers)


async def stream_chat_tokens_per_s(base_url: str, model: str, max_tokens: int) -> float:
    """One streamed chat completion of exactly max_tokens tokens (ignore_eos); its decode rate in tokens/s,
    from the first token to the last."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about a ship."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    first = last = None
    num_chunks = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    num_chunks += 1
    return (num_chunks - 1) / (last - first) if num_chunks > 1 and last > first else float("nan")


def _cpu_seconds_of_task(stat_path: str) -> float:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15 of stat)


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (from /proc/*/stat's ppid)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a whole process so far (all its threads, live and ended); 0 if it is gone."""
    try:
        return _cpu_seconds_of_task(f"/proc/{pid}/stat")
    except OSError:
        return 0.0


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a server's threads so far, by role: the embedding workers (the embedding
    model's worker process, `worker: process`, the default; or the server's threads named inferd-embed*, `worker:
    thread`: single-threaded, no OpenMP team of their own), the event loop (the main thread), and the rest (the
    LLM's step loop and its OpenMP team, thread pools)."""
    out = {"embed workers": 0.0, "event loop": 0.0, "llm and the rest": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = _cpu_seconds_of_task(f"/proc/{pid}/task/{tid}/stat")
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # the thread ended meanwhile
        role = "embed workers" if comm.startswith("inferd-embed") else "event loop" if int(tid) == pid else "llm and the rest"
        out[role] += seconds
    for child in child_pids(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                is_embed_worker = b"inferd.embeddings.worker" in f.read()
        except OSError:
            continue
        out["embed workers" if is_embed_worker else "llm and the rest"] += process_cpu_seconds(child)
    return out


def embed_items_answered(base_url: str) -> float:
    """The server's inferd:request_items_total for the embedding model (inputs answered so far)."""
    import re

    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    pattern = rf'^inferd:request_items_total{{[^}}]*model_name="{MODEL_NAME}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))


def start_mixed_server(llm: str, options: dict[str, str], no_cpu_share: bool) -> Server:
    """`inferd serve` holding the LLM and the embedding model (its options from a models file)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), INFERD_CPU_THREAD_SHARE="off" if no_cpu_share else "on")
    log = tempfile.NamedTemporaryFile("w", prefix="embed-mixed-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "inferd.cli", "serve", "--model", llm, "--port", str(port), "--response-cache-bytes", "0"]
    if options:  # per-model options come from a models file
        models_file = tempfile.NamedTemporaryFile("w", prefix="embed-mixed-models-", suffix=".yaml", delete=False)
        rendered = ", ".join(f"{k}: {v}" for k, v in options.items())
        models_file.write(f"models:\n  - source: {MODEL_NAME}\n    options: {{{rendered}}}\n")
        models_file.close()
        cmd += ["--models-file", models_file.name]
    else:
        cmd += ["--model", MODEL_NAME]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    return Server("inferd", f"http://127.0.0.1:{port}/v1/embeddings", MODEL_NAME, process=process, log_path=log.name)


INVALID = "not counted (the LLM alone collapsed)"


def verdict(keeps: float, embed_share: float) -> str:
    """The goal: the LLM stream slowed by no more than the embeddings' share of the CPU (1 - keeps <= share).
    A round where the LLM beside the embeddings ran 1.5x faster than alone is no comparison: the lone LLM's
    2-thread OpenMP team collapsed on a loaded machine (benchmarks/RESULTS.md); it is not counted as met."""
    if keeps > 1.5:
        return INVALID
    return "met" if 1 - keeps <= embed_share else "NOT met"


def run_mixed(args: argparse.Namespace) -> None:
    """An LLM stream and embedding traffic on one `inferd serve` holding both models: each alone, then together,
    so the LLM's slowdown can be read against the CPU share the embeddings took. With several --variants (the
    embedding model's options), one server per variant, all up at once, rounds alternating between them."""
    llm = args.llm
    variants: dict[str, dict[str, str]] = {}
    for variant in args.variants.split(";"):
        options = dict(option.split("=", 1) for option in variant.split(",") if option)
        if args.embed_num_threads:
            options["num_threads"] = str(args.embed_num_threads)
        variants[variant or "default"] = options
    servers = {name: start_mixed_server(llm, options, args.no_cpu_share) for name, options in variants.items()}
    try:
        if len(wait_ready(list(servers.values()))) < len(servers):
            return
        sentences = make_sentences(args.num_sentences)
        bodies = [[s] for s in sentences]
        print(f"# {machine_line()}")
        print(f"# embedding client: {args.client}, c={args.concurrency}")
        for server in servers.values():
            asyncio.run(stream_chat_tokens_per_s(server.url.rsplit("/v1/", 1)[0], llm, 16))  # warm-up

        def embed_traffic(server: Server, seconds: float) -> float:
            """1-per-request embedding traffic (sentences/s): the whole body list (python), or for `seconds` (wrk)."""
            if args.client == "wrk":
                return wrk_closed_loop(server.url, MODEL_NAME, bodies, args.concurrency, seconds)[0]
            return asyncio.run(closed_loop(server.url, MODEL_NAME, bodies, args.concurrency))[0]

        all_rows: dict[str, dict[str, list[float]]] = {
            name: {"llm alone": [], "embeddings alone": [], "llm with embeddings": [], "embeddings with llm": []}
            for name in servers}
        for round_index in range(args.rounds):
            names = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for name in names:
                server, rows = servers[name], all_rows[name]
                base_url = server.url.rsplit("/v1/", 1)[0]
                pid = server.process.pid  # type: ignore[union-attr]
                t0 = time.perf_counter()
                rows["llm alone"].append(asyncio.run(stream_chat_tokens_per_s(base_url, llm, args.max_tokens)))
                llm_alone_s = time.perf_counter() - t0
                rows["embeddings alone"].append(embed_traffic(server, max(5.0, llm_alone_s)))

                async def together() -> tuple[float, float, dict[str, float], bool]:
                    """Both at once. CPU times and the embedding inputs answered are read when the LLM stream starts
                    and ends, so the embeddings' rate is theirs beside the stream only; `outlasted` says whether the
                    embedding traffic outlasted the stream (the LLM's figure then was all under load)."""
                    if args.client == "wrk":  # stopped (SIGINT) when the stream ends
                        wrk = start_wrk(server.url, MODEL_NAME, bodies, args.concurrency, 10 * llm_alone_s + 30)
                        embed_task = asyncio.create_task(asyncio.to_thread(wrk_result, wrk))
                    else:
                        embed_task = asyncio.create_task(asyncio.to_thread(embed_traffic, server, 0))
                    await asyncio.sleep(1.0)  # the traffic reaches its steady state
                    cpu_before, items_before = thread_cpu_seconds(pid), embed_items_answered(base_url)
                    if args.client == "wrk":  # the embedding client's own CPU, on this same machine
                        cpu_before["embedding client"] = process_cpu_seconds(wrk.pid)
                    t0 = time.perf_counter()
                    llm_rate = await stream_chat_tokens_per_s(base_url, llm, args.max_tokens)
                    wall = time.perf_counter() - t0
                    cpu_after, items_after = thread_cpu_seconds(pid), embed_items_answered(base_url)
                    if args.client == "wrk":
                        cpu_after["embedding client"] = process_cpu_seconds(wrk.pid)
                    outlasted = not embed_task.done()
                    if args.client == "wrk":
                        wrk.send_signal(signal.SIGINT)
                    await embed_task
                    shares = {role: (cpu_after[role] - cpu_before[role]) / (wall * (os.cpu_count() or 1)) for role in cpu_before}
                    return llm_rate, (items_after - items_before) / wall, shares, outlasted

                llm_rate, embed_rate, shares, outlasted = asyncio.run(together())
                if not outlasted:
                    print("# the embedding traffic ended before the LLM stream: raise --num-sentences", flush=True)
                for role, share in shares.items():  # share of the machine's CPU time while the LLM streamed beside them
                    rows.setdefault(f"cpu {role}", []).append(share)
                rows["llm with embeddings"].append(llm_rate)
                rows["embeddings with llm"].append(embed_rate)
                keeps = llm_rate / rows["llm alone"][-1]
                embed_share = shares["embed workers"] + shares["event loop"]
                print(f"# round {round_index + 1} {name}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items())
                      + f"; LLM keeps {keeps:.0%}, embeddings' CPU share {embed_share:.0%}: " + verdict(keeps, embed_share)
                      + f"; load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"\n| variant (embedding options) | {llm} stream tokens/s alone | with {MODEL_NAME} at c={args.concurrency} | "
              "LLM keeps | embeddings sentences/s alone | with the LLM stream | embeddings keep | CPU while both ran: "
              "embed workers + event loop, LLM and the rest | embedding client's CPU | rounds met (of valid) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, rows in all_rows.items():
            med = {k: statistics.median(v) for k, v in rows.items()}
            per_round = [(w / a, e + lp) for w, a, e, lp in zip(rows["llm with embeddings"], rows["llm alone"],
                                                                rows["cpu embed workers"], rows["cpu event loop"])]
            print(f"| {name} | {med['llm alone']:.1f} | {med['llm with embeddings']:.1f} | "
                  f"{med['llm with embeddings'] / med['llm alone']:.0%} ({', '.join(f'{k:.0%}' for k, _ in per_round)}) | "
                  f"{med['embeddings alone']:.1f} | {med['embeddings with llm']:.1f} | "
                  f"{med['embeddings with llm'] / med['embeddings alone']:.0%} | "
                  f"{med['cpu embed workers']:.0%} + {med['cpu event loop']:.0%}, {med['cpu llm and the rest']:.0%} | "
                  f"{statistics.median(rows.get('cpu embedding client', [float('nan')])):.0%} | "
                  f"{sum(verdict(k, sh) == 'met' for k, sh in per_round)} of "
                  f"{sum(verdict(k, sh) != INVALID for k, sh in per_round)} |")
    finally:
        stop_servers(list(servers.values()))


def batch_size_sum_count(base_url: str) -> tuple[float, float]:
    """The server's inferd:batch_size histogram for the embedding model: (sum of inputs, number of batches)."""
    import re

    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    totals = []
    for suffix in ("sum", "count"):
        pattern = rf'^inferd:batch_size_{suffix}{{[^}}]*model_name="{MODEL_NAME}"[^}}]*}} (\S+)$'
        totals.append(sum(float(v) for v in re.findall(pattern, text, flags=re.M)))
    return totals[0], totals[1]


def run_served(args: argparse.Namespace) -> None:
    """inferd servers (variants: inferd+OPTION=VALUE+...) against our own in-process rate, measured in the same
    rounds: wrk as the client (1 per request at c=1 and c=32, 32 per request at c=4), the in-process rate at 1 and 2
    threads while the servers are idle, the servers' mean batch size from their metrics. For the goals stated
    against the in-process batch-32 rate at the same thread count."""
    import torch

    from inferd.embeddings import Embedder

    path = model_dir()
    sentences = make_sentences(args.num_sentences)
    scenarios = [("1/req c=1", 1, 1), ("1/req c=8", 1, 8), ("1/req c=32", 1, 32), ("32/req c=4", 32, 4)]
    scenarios = [sc for sc in scenarios if sc[0] in args.scenarios.split(",")]
    servers = start_servers(args.servers.split(","), path, [])
    try:
        servers = wait_ready(servers)
        print(f"# {machine_line()}")
        offline = Embedder(path, device="cpu", dtype="float32", max_batch_items=32)
        offline_ids = offline.model.tokenizer.encode_batch(sentences, truncate=True)
        offline.embed_token_ids(offline_ids[:64])  # warm-up
        offline_rates: dict[int, list[float]] = {}
        results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
        loads = []
        for round_index in range(args.rounds):
            for num_threads in (2, 1):  # our own in-process rate, every server idle, this round
                torch.set_num_threads(num_threads)
                t0 = time.perf_counter()
                for i in range(0, len(offline_ids), 32):
                    offline.embed_token_ids(offline_ids[i : i + 32])
                offline_rates.setdefault(num_threads, []).append(len(offline_ids) / (time.perf_counter() - t0))
            print(f"# round {round_index + 1} offline batch 32: 2 threads {offline_rates[2][-1]:.1f}, 1 thread "
                  f"{offline_rates[1][-1]:.1f} sentences/s; load {os.getloadavg()[0]:.1f}", flush=True)
            for label, per_request, concurrency in scenarios:
                bodies = [sentences[i : i + per_request] for i in range(0, len(sentences), per_request)]
                order = servers if round_index % 2 == 0 else list(reversed(servers))
                for server in order:
                    base_url = server.url.rsplit("/v1/", 1)[0]
                    wrk_closed_loop(server.url, server.model, bodies, concurrency, 1)  # warm
                    before = batch_size_sum_count(base_url)
                    rate, p50, errors = wrk_closed_loop(server.url, server.model, bodies, concurrency, args.seconds)
                    after = batch_size_sum_count(base_url)
                    mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    load = os.getloadavg()[0]
                    loads.append(load)
                    results.setdefault((server.name, label), []).append((rate, p50, mean_batch, load))
                    print(f"# round {round_index + 1} {label} {server.name}: {rate:.1f} sentences/s, p50 {p50:.1f} ms, "
                          f"mean batch {mean_batch:.1f}" + (f", {errors} errors" if errors else "") + f"; load {load:.1f}",
                          flush=True)
        off2, off1 = statistics.median(offline_rates[2]), statistics.median(offline_rates[1])
        print(f"\nin process, batch 32 (medians of {args.rounds}): 2 threads {off2:.1f} (rounds "
              f"{', '.join(f'{r:.1f}' for r in offline_rates[2])}), 1 thread {off1:.1f} (rounds "
              f"{', '.join(f'{r:.1f}' for r in offline_rates[1])}); load {min(loads):.1f}-{max(loads):.1f}\n")
        print("| wrk, medians | " + " | ".join(f"{label}: sentences/s (p50 ms), mean batch" for label, *_ in scenarios)
              + " | 1/req c=32 / in-process 2 threads (rounds) |")
        print("|---|" + "---|" * (len(scenarios) + 1))
        for server in servers:
            cells = []
            for label, *_ in scenarios:
                runs = results[(server.name, label)]
                cells.append(f"{statistics.median(r[0] for r in runs):.1f} ({statistics.median(r[1] for r in runs):.0f}), "
                             f"{statistics.median(r[2] for r in runs):.1f}")
            c32 = results.get((server.name, "1/req c=32"))
            ratio = "-" if not c32 else (f"{statistics.median(r[0] for r in c32) / off2:.0%} ("
                                         + ", ".join(f"{r[0] / o:.0%}" for r, o in zip(c32, offline_rates[2])) + ")")
            print(f"| {server.name} | " + " | ".join(cells) + f" | {ratio} |")
    finally:
        stop_servers(servers)


# The FastAPI route parses any application/*+json body; `inferd serve`'s hot path takes application/json only.
FASTAPI_ROUTE_CONTENT_TYPE = "application/x-inferd-bench+json"


def run_hotpath(args: argparse.Namespace) -> None:
    """One `inferd serve` (the embedding model), wrk as the client: the same one-sentence bodies through the bare
    ASGI hot path (Content-Type application/json) and through the FastAPI route (a +json type FastAPI parses but
    the hot path leaves to it), alternating, medians of `--rounds`; the server's CPU per request by thread group
    (event loop, embedding workers) from /proc."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    log = tempfile.NamedTemporaryFile("w", prefix="embed-hotpath-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "inferd.cli", "serve", "--model", MODEL_NAME, "--port", str(port), "--response-cache-bytes", "0"]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    server = Server("inferd", f"http://127.0.0.1:{port}/v1/embeddings", MODEL_NAME, process=process, log_path=log.name)
    try:
        if not wait_ready([server]):
            return
        bodies = [[s] for s in make_sentences(args.num_sentences)]
        print(f"# {machine_line()}")
        doors = {"hot path (application/json)": "application/json", "FastAPI route (+json)": FASTAPI_ROUTE_CONTENT_TYPE}
        rows: dict[str, list[tuple[float, float, float, float]]] = {door: [] for door in doors}
        for door, content_type in doors.items():  # warm-up, and both doors answer
            _rate, _p50, errors = wrk_closed_loop(server.url, MODEL_NAME, bodies, args.concurrency, 2, content_type)
            if errors:
                raise SystemExit(f"{door}: {errors} errors")
        for round_index in range(args.rounds):
            for door, content_type in (doors.items() if round_index % 2 == 0 else reversed(doors.items())):
                cpu_before = thread_cpu_seconds(process.pid)
                rate, p50, errors = wrk_closed_loop(server.url, MODEL_NAME, bodies, args.concurrency, args.seconds, content_type)
                cpu_after = thread_cpu_seconds(process.pid)
                num_requests = rate * args.seconds
                loop_ms = (cpu_after["event loop"] - cpu_before["event loop"]) / num_requests * 1e3
                workers_ms = (cpu_after["embed workers"] - cpu_before["embed workers"]) / num_requests * 1e3
                rows[door].append((rate, p50, loop_ms, workers_ms))
                print(f"# round {round_index + 1} {door}: {rate:.1f} sentences/s, p50 {p50:.1f} ms, server CPU per request: "
                      f"event loop {loop_ms:.2f} ms, embedding workers {workers_ms:.2f} ms"
                      + (f", {errors} errors" if errors else "") + f"; load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"\n| one sentence per request, wrk c={args.concurrency} | sentences/s | p50 ms | event loop CPU ms/request "
              "| embedding workers CPU ms/request |")
        print("|---|---|---|---|---|")
        for door, runs in rows.items():
            med = [statistics.median(r[i] for r in runs) for i in range(4)]
            print(f"| {door} | {med[0]:.1f} | {med[1]:.0f} | {med[2]:.2f} | {med[3]:.2f} |")
    finally:
        stop_servers([server])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("offline")
    p.add_argument("--num-sentences", type=int, default=2000)
    p.add_argument("--num-batch1", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    p.add_argument("--int8", action="store_true", help="also the opt-in int8 encoder (quantization: int8)")
    p.add_argument("--nn-linear", action="store_true", help="also the encoder on nn.Linear (torch's BLAS), no oneDNN")
    p.set_defaults(func=run_offline)
    p = sub.add_parser("attention")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_attention)
    p = sub.add_parser("http")
    p.add_argument("--servers", default="inferd,fastapi-st,infinity,litserve,litserve-nobatch")
    p.add_argument("--num-sentences", type=int, default=2000)
    p.add_argument("--inferd-args", default="", help="extra flags for inferd serve")
    p.add_argument("--inferd-num-threads", type=int, default=0,
                   help="the embedding model's num_threads option for server inferd (inferd-1thread: 1)")
    p.add_argument("--num-c1", type=int, default=300, help="sentences sent at concurrency 1")
    p.add_argument("--offline-threads", default="1,2",
                   help="also measure inferd in process at these torch thread counts each round ('' : not)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--wrk-scenarios", default="1/req c=32",
                   help="scenarios also run with wrk as the client, every server ('' : none), e.g. '1/req c=32,1/req c=8'")
    p.add_argument("--wrk-seconds", type=float, default=10.0, help="length of each wrk run")
    p.set_defaults(func=run_http)
    p = sub.add_parser("hotpath")
    p.add_argument("--num-sentences", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each wrk run")
    p.add_argument("--rounds", type=int, default=4)
    p.set_defaults(func=run_hotpath)
    p = sub.add_parser("served")
    p.add_argument("--servers", default="inferd,inferd+fill_wait_ms=0",
                   help="inferd variants: inferd+OPTION=VALUE+... sets the embedding model's options")
    p.add_argument("--scenarios", default="1/req c=1,1/req c=8,1/req c=32,32/req c=4")
    p.add_argument("--num-sentences", type=int, default=640)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each wrk run")
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(func=run_served)
    p = sub.add_parser("mixed")
    p.add_argument("--llm", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-sentences", type=int, default=400, help="1 per request, closed loop")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--embed-num-threads", type=int, default=0, help="the embedding model's num_threads option")
    p.add_argument("--variants", default="",
                   help="';'-separated embedding model options, one server each, e.g. ';num_threads=1' (default "
                        "options, then one worker)")
    p.add_argument("--client", choices=["python", "wrk"], default="python",
                   help="the embedding traffic's client: httpx (runs the whole sentence list) or wrk (for as long as needed)")
    p.add_argument("--no-cpu-share", action="store_true",
                   help="INFERD_CPU_THREAD_SHARE=off: each model keeps its own thread count (the LLM all CPUs)")
    p.set_defaults(func=run_mixed)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    args.func(args)


if __name__ == "__main__":
    main()
