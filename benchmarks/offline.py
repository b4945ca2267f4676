"""Offline decode speed: inferd vs Hugging Face transformers `generate()`, same model, prompts and machine, one run.

    .venv/bin/python benchmarks/offline.py [--model smollm2-135m-instruct] [--new-tokens 128] [--batch 16]
        [--repeats 3] [--quantization auto,none] [--prefill-tokens 512]

Both sides: greedy, fixed output length (transformers min_new_tokens = max_new_tokens, inferd ignore_eos),
float32 activations on CPU. inferd runs once per `--quantization` scheme: `auto` keeps the GGUF file's own
Q4_1 / Q8_0 blocks (the same weights transformers dequantizes to float32; greedy tokens are checked equal in
tests/test_engine.py), `none` dequantizes them to float32 as transformers does. Runs alternate (each inferd
scheme, transformers, ...) and the median of `--repeats` is reported, because these 2-core machines are noisy.
Also prints achieved weight-read bandwidth (weight bytes read per decode step x steps/s) next to the machine's
measured copy bandwidth, so each speed is read against the hardware limit.

--prefill-tokens N: then the time to first token of one N-token prompt (max_tokens 1) on the first inferd scheme,
with CPU prefill attention as inferd runs it (every token one row of the fused decode kernel: batch-invariant) and
as it ran before (torch SDPA for multi-token steps, switched in by patching the attention module's kernel check),
alternating, median of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

PROMPTS = [
    "Explain how a bicycle stays upright while moving.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation?",
    "Give three tips for learning a new language.",
    "Describe the water cycle to a ten year old.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
    "Why is the sky blue?",
    "List some healthy breakfast ideas.",
    "What does a compiler do?",
    "Tell me a fun fact about octopuses.",
    "How does a refrigerator keep food cold?",
    "What is photosynthesis?",
    "Suggest a name for a friendly robot.",
    "How do I make a good cup of tea?",
]


def measure_copy_bandwidth_gbps(num_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read+write bandwidth of a large tensor copy, GB/s (the ceiling a weight-streaming decode runs against)."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * num_bytes / best / 1e9


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    from inferd.engine.chat_template import ChatTemplateError

    try:
        return tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    except ChatTemplateError:  # a base model (gemma-3-270m): the raw text
        return tokenizer.encode(text)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer (packed bytes when block-quantized) and the
    output projection; the embedding table only when it is the (float, tied) output projection."""
    from inferd.quant import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.weight_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    if model.lm_head is None and model.quant_lm_head is None:
        embed = model.model.embed_tokens.weight
        total += embed.numel() * embed.element_size()
    return total


def run_inferd(llm, prompt_ids: list[list[int]], new_tokens: int) -> float:
    from inferd import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_ids, params)
    dt = time.perf_counter() - t0
    num_generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_generated == new_tokens * len(prompt_ids), num_generated
    return num_generated / dt


def run_hf(model, prompt_ids: list[list[int]], new_tokens: int, pad_id: int) -> float:
    max_len = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompt_ids):  # left padding, as batched generation needs
        input_ids[i, max_len - len(p):] = torch.tensor(p)
        attention_mask[i, max_len - len(p):] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
        )
    dt = time.perf_counter() - t0
    num_generated = (out.shape[1] - max_len) * out.shape[0]
    return num_generated / dt


def print_prefill_attention(named_llm, num_tokens: int, repeats: int) -> None:
    from inferd import SamplingParams
    from inferd.kernels import KERNEL_BACKENDS
    from inferd.models.llama import Attention

    name, llm = named_llm
    text_ids = llm.tokenizer.encode(" ".join(PROMPTS) * (num_tokens // 100 + 1))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    attention_layers = [m for m in llm.engine.model.modules() if isinstance(m, Attention)]
    kernel_backend = attention_layers[0].kernel_backend
    # The attention layers' kernel backend: the model's own (the fused kernel), or the torch reference (SDPA).
    modes = {"decode-kernel rows (batch-invariant)": kernel_backend,
             "torch SDPA (before)": KERNEL_BACKENDS["torch-reference"]}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(repeats + 1):  # the first round warms up
        for i, (mode, backend) in enumerate(modes.items()):
            prompt = [text_ids[rep * len(modes) + i]] + text_ids[: num_tokens - 1]  # no prefix-cache hit
            for layer in attention_layers:
                layer.kernel_backend = backend
            try:
                t0 = time.perf_counter()
                llm.generate([prompt], params)
                if rep:
                    times[mode].append(time.perf_counter() - t0)
            finally:
                for layer in attention_layers:
                    layer.kernel_backend = kernel_backend
    med = {mode: statistics.median(ts) * 1e3 for mode, ts in times.items()}
    base = med["torch SDPA (before)"]
    print(f"\n{name}, one {num_tokens}-token prompt, time to first token (median of {repeats}):")
    print("| prefill attention | TTFT ms | vs SDPA |\n|---|---|---|")
    for mode, ms in med.items():
        print(f"| {mode} | {ms:.0f} | {ms / base:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", default="auto,none",
                    help="comma-separated inferd weight schemes to run (auto, none, gguf, int8, int4)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--prefill-tokens", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="then profile one request (64 new tokens) of the first inferd scheme: top ops by CPU time")
    args = ap.parse_args()

    from inferd import LLM
    from inferd.store import resolve_model

    resolved = resolve_model(args.model)
    llms, weight_bytes = {}, {}
    for scheme in args.quantization.split(","):
        llm = LLM(model=args.model, dtype="float32", device="cpu", quantization=scheme)
        name = f"inferd[{llm.engine.config.quantization}]"
        llms[name] = llm
        weight_bytes[name] = weight_bytes_per_step(llm.engine.model)
    prompts = [chat_prompt_ids(llm.tokenizer, p) for p in PROMPTS[: args.batch]]

    hf_model = None
    if not args.skip_hf:
        from pathlib import Path

        from transformers import AutoModelForCausalLM

        path = Path(resolved.path)
        if resolved.format == "gguf":
            hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        hf_model.eval()
    pad_id = llm.tokenizer.eos_token_id

    bw = measure_copy_bandwidth_gbps()
    print(f"machine: {torch.get_num_threads()} torch threads, measured copy bandwidth {bw:.1f} GB/s", file=sys.stderr)
    for name, num_bytes in weight_bytes.items():
        print(f"model: {args.model} as {name}: {num_bytes / 1e6:.0f} MB of weights per decode step; ceiling for "
              f"one stream ~{bw * 1e9 / num_bytes:.1f} tok/s at copy bandwidth", file=sys.stderr)

    # Warm up every engine (first calls allocate and page in weights).
    for llm in llms.values():
        run_inferd(llm, prompts[:1], 8)
    if hf_model is not None:
        run_hf(hf_model, prompts[:1], 8, pad_id)

    engines = [*llms, "transformers"] if hf_model is not None else [*llms]
    results: dict[tuple[str, int], list[float]] = {(e, n): [] for e in engines for n in (1, args.batch)}
    for rep in range(args.repeats):
        for n in (1, args.batch):
            for name, llm in llms.items():
                results[(name, n)].append(run_inferd(llm, prompts[:n], args.new_tokens))
            if hf_model is not None:
                results[("transformers", n)].append(run_hf(hf_model, prompts[:n], args.new_tokens, pad_id))
        print(f"repeat {rep + 1}: " + ", ".join(f"{e}x{n} {v[-1]:.1f}" for (e, n), v in results.items()),
              file=sys.stderr)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n| case | engine | tok/s (median of {args.repeats}) | vs transformers | weight-read GB/s (of {bw:.1f}) |")
    print("|---|---|---|---|---|")
    for n in (1, args.batch):
        case = f"{n} request{'s' if n > 1 else ''}, {args.new_tokens} new tokens"
        theirs = med.get(("transformers", n))
        for name in engines:
            tok_s = med[(name, n)]
            ratio = f"{tok_s / theirs:.2f}x" if theirs else "-"
            num_bytes = weight_bytes.get(name)
            if num_bytes is None:  # transformers: float32 linear weights, tied head included
                num_bytes = sum(m.weight.numel() * 4 for m in hf_model.modules() if isinstance(m, torch.nn.Linear))
            achieved = num_bytes * tok_s / n / 1e9
            print(f"| {case} | {name} | {tok_s:.1f} | {ratio} | {achieved:.1f} |")
    if args.prefill_tokens:
        print_prefill_attention(next(iter(llms.items())), args.prefill_tokens, args.repeats)
    if args.profile:
        from torch.profiler import profile

        name, llm = next(iter(llms.items()))
        num_tokens = 64
        with profile() as prof:
            run_inferd(llm, prompts[:1], num_tokens)
        print(f"\n{name}, 1 request x {num_tokens} tokens; ms per token = self CPU total / {num_tokens}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
