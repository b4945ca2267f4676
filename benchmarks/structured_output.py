"""What a JSON schema costs per output token: constrained vs unconstrained decoding, same engine, same prompts.

    PYTHONPATH=. INFERD_HOME=~/.cache/inferd-test .venv/bin/python benchmarks/structured_output.py \
        [--model smollm2-135m-instruct] [--repeats 3] [--max-tokens 96]

At 1 and 16 concurrent requests (one `LLM.generate` call holds the 16), alternating unconstrained and constrained
runs `--repeats` times; each request's TPOT is (finish - first token) / (output tokens - 1) from the engine's own
timestamps, and the figure is the median over requests and repeats. The unconstrained run ignores EOS so it
decodes as long as the constrained one (which ends when its JSON closes). Also: the grammar compile time of a
schema the server has not seen (cold, a new schema each repeat) and of a repeat (a cache hit).
Prints a table and writes out/structured_output.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from inferd.api import LLM
from inferd.request import SamplingParams, StructuredOutputsParams

# An order of 6-8 line items: long enough (~100-150 tokens) that decode dominates, typical of extraction work.
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 30},
        "items": {
            "type": "array",
            "minItems": 6,
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "product": {"type": "string", "maxLength": 24},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "unit_price": {"type": "number", "minimum": 0, "maximum": 10000},
                },
                "required": ["product", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "express"],
    "additionalProperties": False,
}
ASKS = [
    "Write a grocery order for Ana as JSON.", "Create an office supplies order for Ben in JSON.",
    "Give me a hardware store order for Chloe as JSON.", "Make a bakery order for Dev in JSON.",
    "Write a pet shop order for Eva as JSON.", "Create a garden center order for Finn in JSON.",
    "Give me a bookshop order for Gia as JSON.", "Make a pharmacy order for Hugo in JSON.",
]


def tpots(outputs) -> list[float]:
    values = []
    for output in outputs:
        metrics = output.metrics
        num_tokens = len(output.outputs[0].token_ids)
        if num_tokens > 1 and metrics.finished_time and metrics.first_token_time:
            values.append((metrics.finished_time - metrics.first_token_time) / (num_tokens - 1))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default="out/structured_output.json")
    args = parser.parse_args()

    llm = LLM(args.model, kv_cache_memory="512MiB", max_model_len=2048, speculative="off")
    tokenizer = llm.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": a}]) for a in ASKS]
    constraint = StructuredOutputsParams(json=json.dumps(ORDER_SCHEMA))
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_outputs=constraint)
    llm.generate(prompts[:2], constrained)  # warm-up: kernels, the grammar tokenizer, the compiled schema

    results: dict[str, dict[str, list[float]]] = {}
    for concurrency in (1, 16):
        batch = (prompts * 2)[:concurrency] if concurrency > 1 else prompts[:4]
        for _ in range(args.repeats):
            for name, params in (("unconstrained", free), ("json_schema", constrained)):
                values = results.setdefault(f"c{concurrency}", {}).setdefault(name, [])
                if concurrency == 1:
                    for prompt in batch:
                        values += tpots(llm.generate([prompt], params))
                else:
                    values += tpots(llm.generate(batch, params))

    compiler = llm.engine.grammar_compiler
    cold_ms, hit_ms = [], []
    for i in range(args.repeats):
        schema = {**ORDER_SCHEMA, "title": f"order-{i}-{time.time_ns()}"}  # a schema never seen before
        params = StructuredOutputsParams(json=json.dumps(schema))
        start = time.perf_counter()
        compiler.compile(params)
        cold_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        compiler.compile(params)
        hit_ms.append((time.perf_counter() - start) * 1e3)

    report = {"model": args.model, "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
              "grammar_tokenizer_setup_s": compiler.tokenizer_setup_seconds,
              "compile_cold_ms_median": statistics.median(cold_ms), "compile_cached_ms_median": statistics.median(hit_ms),
              "tpot_ms": {}}
    print(f"{'concurrency':>11} {'unconstrained TPOT ms':>22} {'json_schema TPOT ms':>20} {'ratio':>6}")
    for key, runs in results.items():
        free_ms = statistics.median(runs["unconstrained"]) * 1e3
        json_ms = statistics.median(runs["json_schema"]) * 1e3
        report["tpot_ms"][key] = {"unconstrained": free_ms, "json_schema": json_ms, "ratio": json_ms / free_ms}
        print(f"{key[1:]:>11} {free_ms:>22.1f} {json_ms:>20.1f} {json_ms / free_ms:>6.2f}")
    print(f"grammar tokenizer setup {compiler.tokenizer_setup_seconds:.2f} s; schema compile: first "
          f"{report['compile_cold_ms_median']:.2f} ms, cached {report['compile_cached_ms_median']:.3f} ms (medians)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
