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
3. `--llamacpp BIN`: llama.cpp's llama-server on the same GGUF file, once per `--llamacpp-spec-types` entry
   (`none` and its n-gram lookup types, e.g. ngram-simple), each task's same prompt token ids through /completion,
   greedy, `--new-tokens` tokens, ignore_eos, one slot, `--threads` threads. Its own timings are reported (decode:
   predicted tokens / predicted ms; end-to-end: the client's wall time per request) beside inferd's in-process
   figures, alternating with inferd's modes in every repeat.
Modes: off (the peer), auto (the default: prompt lookup while few sequences run), ngram (prompt lookup always),
draft (the draft model `--speculative-model` always: a checkpoint with the same tokenizer, or self:K, the target's
first K layers), off-layers (off, with the decoder run layer by layer instead of the fused kernel). All engines are loaded once; runs alternate (off, auto, ..., then reversed: ..., auto, off) and
the median of `--repeats` is reported, because these 2-core machines are noisy. Each mode's draft / accepted counters, the CPU
flags and the load average (1-minute, before and after) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from http_overhead import wait_until_healthy
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


def run_batch(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """All prompts at once. -> (output tokens/s of wall time, this process's CPU ms per output token).
    CPU time is the steadier figure on a shared machine: time spent descheduled does not count in it."""
    from inferd import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    cpu0 = _process_cpu_s()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    cpu_s = _process_cpu_s() - cpu0
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return num_tokens / dt, 1000.0 * cpu_s / num_tokens


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LlamaServer:
    """One llama-server process on the GGUF file with one speculative type (`none`: speculation off)."""

    def __init__(self, binary: str, gguf_path: str, spec_type: str, port: int, threads: int, ctx: int) -> None:
        self.spec_type = spec_type
        self.url = f"http://127.0.0.1:{port}"
        cmd = [binary, "--model", gguf_path, "--port", str(port), "--host", "127.0.0.1", "--threads", str(threads),
               "--threads-batch", str(threads), "--ctx-size", str(ctx), "--parallel", "1", "--no-webui",
               "--no-warmup"]
        if spec_type != "none":
            cmd += ["--spec-type", spec_type]
        self.log = tempfile.NamedTemporaryFile(prefix=f"llama-server-{spec_type}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until_healthy(self.proc, self.url, f"llama-server ({spec_type})", self.log.name, timeout_s=120)

    def complete(self, prompt_ids: list[int], new_tokens: int) -> tuple[dict, list[int], float]:
        """-> (llama.cpp's timings, generated token ids, client wall seconds)."""
        body = {"prompt": prompt_ids, "n_predict": new_tokens, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                "ignore_eos": True, "cache_prompt": False, "return_tokens": True, "stream": False}
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            answer = json.loads(r.read())
        return answer["timings"], list(answer.get("tokens") or []), time.perf_counter() - t0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_single_llamacpp(server: LlamaServer, prompts: list[list[int]], new_tokens: int
                        ) -> tuple[float, float, list[list[int]], int, int]:
    """-> (decode tokens/s by llama.cpp's timings, end-to-end tokens/s by the client's clock, token ids per
    prompt, draft tokens, accepted draft tokens)."""
    num_decode = num_total = num_draft = num_accepted = 0
    decode_ms = total_s = 0.0
    token_ids = []
    for prompt in prompts:
        timings, ids, wall_s = server.complete(prompt, new_tokens)
        token_ids.append(ids)
        num_decode += int(timings["predicted_n"])
        decode_ms += float(timings["predicted_ms"])
        num_total += int(timings["predicted_n"])
        total_s += wall_s
        num_draft += int(timings.get("draft_n", 0))
        num_accepted += int(timings.get("draft_n_accepted", 0))
    return 1000.0 * num_decode / decode_ms, num_total / total_s, token_ids, num_draft, num_accepted


def _speculative_of(mode: str) -> str:
    return "off" if mode == "off-layers" else mode


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
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="inferd engines without prefix caching, so a repeat's prefill is computed again (as "
                         "llama.cpp's is: its requests set cache_prompt false); end-to-end figures then compare")
    ap.add_argument("--llamacpp", default=None, metavar="BIN",
                    help="llama-server binary: run llama.cpp on the same GGUF file as a peer (single stream)")
    ap.add_argument("--llamacpp-spec-types", default="none,ngram-simple",
                    help="llama-server --spec-type values to run, one server each (none: speculation off)")
    ap.add_argument("--llamacpp-threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    from inferd import LLM

    modes = ["off"] + [m for m in args.modes.split(",") if m and m != "off"]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, flags {cpu_flags()}; "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    draft_k = args.draft_num_tokens or args.num_speculative_tokens
    llms = {mode: LLM(model=args.model, dtype="float32", device="cpu", speculative=_speculative_of(mode),
                      kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
                      num_speculative_tokens=draft_k if mode == "draft" else args.num_speculative_tokens,
                      speculative_model=args.speculative_model if mode == "draft" else None)
            for mode in modes}
    if "off-layers" in llms:  # the decoder layer by layer, as before the fused kernel (torch.ops.inferd.decoder_layers)
        llms["off-layers"].engine.model.fused_layers_enabled = False
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

    peers: dict[str, LlamaServer] = {}
    if args.llamacpp:
        from inferd.store.pull import resolve_model

        gguf_path = str(resolve_model(args.model).path)
        if not gguf_path.endswith(".gguf"):
            raise SystemExit(f"--llamacpp needs a GGUF model; {args.model} resolved to {gguf_path}")
        ctx = max(map(len, grounded)) + args.new_tokens + 64
        for i, spec_type in enumerate(t for t in args.llamacpp_spec_types.split(",") if t):
            peers[f"llama.cpp[{spec_type}]"] = LlamaServer(shutil.which(args.llamacpp) or args.llamacpp, gguf_path,
                                                           spec_type, 18300 + i, args.llamacpp_threads, ctx)
        print(f"llama.cpp peers on {gguf_path}: {', '.join(peers)} ({args.llamacpp_threads} threads, one slot)",
              flush=True)

    decode = {m: [] for m in [*llms, *peers]}
    e2e = {m: [] for m in [*llms, *peers]}
    batch = {m: [] for m in llms}
    batch_cpu_ms = {m: [] for m in llms}
    peer_drafts = {m: [0, 0] for m in peers}
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
        for name, server in (peers.items() if r % 2 == 0 else list(peers.items())[::-1]):
            d, e, ids, num_draft, num_accepted = run_single_llamacpp(server, grounded, args.new_tokens)
            decode[name].append(d)
            e2e[name].append(e)
            tokens_of[name] = ids
            peer_drafts[name][0] += num_draft
            peer_drafts[name][1] += num_accepted
            print(f"  repeat {r}: single {name} decode {d:6.1f} tok/s, end-to-end {e:6.1f} tok/s "
                  f"({num_draft} drafted, {num_accepted} accepted)", flush=True)
        for mode, llm in order:
            drafts_before = llm.engine.get_stats().num_spec_draft_tokens
            b, cpu_ms = run_batch(llm, loaded, args.batch_new_tokens)
            batch[mode].append(b)
            batch_cpu_ms[mode].append(cpu_ms)
            num_drafts = llm.engine.get_stats().num_spec_draft_tokens - drafts_before
            print(f"  repeat {r}: batch  {mode:5s} {b:6.1f} tok/s, {cpu_ms:.3f} CPU ms/token "
                  f"({num_drafts} draft tokens verified)", flush=True)
        loads.append(os.getloadavg()[0])
    for server in peers.values():
        server.close()
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in
           (("decode", decode), ("e2e", e2e), ("batch", batch))}
    print(f"load average (1 min) per repeat: {' '.join(f'{x:.2f}' for x in loads)}")
    for mode in modes[1:]:
        stats = llms[mode].engine.get_stats()
        print(f"{mode}: greedy tokens identical to off: {tokens_of[mode] == tokens_of['off']}; "
              f"{stats.num_spec_draft_tokens} draft tokens verified, {stats.num_spec_accepted_tokens} accepted "
              f"({stats.num_spec_accepted_tokens / max(1, stats.num_spec_draft_tokens):.0%})")
    for name in peers:
        num_draft, num_accepted = peer_drafts[name]
        same = sum(a == b for a, b in zip(tokens_of[name], tokens_of["off"]))
        print(f"{name}: {num_draft} draft tokens, {num_accepted} accepted ({num_accepted / max(1, num_draft):.0%}); "
              f"greedy tokens equal to inferd off on {same} of {len(tokens_of['off'])} tasks")
    others = modes[1:]
    print("| workload | off tok/s | " + " | ".join(f"{m} tok/s | {m} / off" for m in others) + " |")
    print("|---|---:|" + "---:|---:|" * len(others))
    for name, key in (("single stream, grounded: decode", "decode"), ("single stream, grounded: end-to-end", "e2e"),
                      (f"{len(loaded)} concurrent, chat prompts", "batch")):
        cells = " | ".join(f"{med[key][m]:.1f} | {med[key][m] / med[key]['off']:.2f}x" for m in others)
        print(f"| {name} | {med[key]['off']:.1f} | {cells} |")
    if peers:
        base = next(iter(peers))
        print(f"\n| single stream, grounded (llama.cpp) | " + " | ".join(f"{m} tok/s | {m} / {base}" for m in peers)
              + " |")
        print("|---|" + "---:|---:|" * len(peers))
        for label, key in (("decode", "decode"), ("end-to-end (client clock)", "e2e")):
            cells = " | ".join(f"{med[key][m]:.1f} | {med[key][m] / med[key][base]:.2f}x" for m in peers)
            print(f"| {label} | {cells} |")
    if peers:
        # Paired per repeat: inferd off and each llama.cpp mode ran back to back, so their ratio is steadier than
        # the ratio of medians on a shared machine.
        for name in peers:
            ratios = [o / p for o, p in zip(decode["off"], decode[name])]
            print(f"decode inferd off / {name} per repeat: {' '.join(f'{x:.3f}' for x in ratios)}; median "
                  f"{statistics.median(ratios):.3f} (TPOT ratio {1 / statistics.median(ratios):.3f})")
    if args.repeats > 1 and "auto" in batch:
        # Neighbouring runs share the machine's state; the median of their ratios is the steadiest comparison.
        ratios = [b / o for b, o in zip(batch["auto"], batch["off"])]
        cpu_ratios = [a / o for a, o in zip(batch_cpu_ms["auto"], batch_cpu_ms["off"])]
        print(f"batch auto / off tok/s per repeat: {' '.join(f'{x:.3f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.3f}")
        print(f"batch CPU ms per token: off median {statistics.median(batch_cpu_ms['off']):.3f}, auto median "
              f"{statistics.median(batch_cpu_ms['auto']):.3f}; auto / off per repeat "
              f"{' '.join(f'{x:.3f}' for x in cpu_ratios)}; median {statistics.median(cpu_ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
