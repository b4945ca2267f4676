"""The transformers baseline: the bench workload run offline through `model.generate`, static batches of C.

No server: for each concurrency C the same seeded prompts `inferd bench serve` would send (the prompt lengths
calibrated with the model's own tokenizer) go through `generate` C at a time, greedy, exactly --output-len new
tokens each. A logits processor timestamps every decode step: TTFT = first step - batch start, and the steps
after it give ITL; TPOT and E2E follow as in the bench tool. The result JSON has the bench tool's layout, so
`inferd bench plot` and compare.sh read it like any server's.

    python benchmarks/peers/transformers_offline.py --model-dir DIR --max-concurrency 1,4,16 --result-json F
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList  # noqa: E402

from inferd.bench import datasets  # noqa: E402
from inferd.bench.metrics import RequestResult, compute_metrics  # noqa: E402
from inferd.bench.serve import format_table, parse_concurrencies  # noqa: E402


class StepClock(LogitsProcessor):
    """Records time.perf_counter() each time generate asks for the next token's logits (once per step)."""

    def __init__(self) -> None:
        self.step_times_s: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.step_times_s.append(time.perf_counter())
        return scores


def run_batch(model, tokenizer, requests: list[datasets.BenchRequest]) -> list[RequestResult]:
    prompts = [request.as_prompt() for request in requests]
    max_new_tokens = max(request.max_tokens for request in requests)
    clock = StepClock()
    start_s = time.perf_counter()
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)  # input_ids [batch, max prompt len]
    with torch.inference_mode():
        output_ids = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=tokenizer.pad_token_id,
        )  # [batch, max prompt len + max_new_tokens]
    end_s = time.perf_counter()
    steps_s = clock.step_times_s
    num_prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
    num_new_tokens = output_ids.shape[1] - inputs["input_ids"].shape[1]
    return [
        RequestResult(
            is_success=True,
            prompt_tokens=int(num_prompt_tokens[i]),
            output_tokens=num_new_tokens,
            has_usage=True,
            requested_output_tokens=request.max_tokens,
            # The first step's logits exist once prefill has run: that token is out then.
            ttft_s=steps_s[0] - start_s,
            e2e_s=end_s - start_s,
            itl_s=[later - earlier for earlier, later in zip(steps_s, steps_s[1:])],
        )
        for i, request in enumerate(requests)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="Hugging Face directory (see gguf_to_hf.py)")
    parser.add_argument("--label", default="transformers")
    parser.add_argument("--max-concurrency", type=parse_concurrencies, default=[1], help="batch sizes, comma list")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    warmup = datasets.random_requests(1, 16, 4, seed=args.seed + 1_000_003)
    run_batch(model, tokenizer, warmup)

    result = {
        "config": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_url": "offline",
            "model": str(args.model_dir),
            "endpoint": "generate",
            "label": args.label,
            "dataset": "random",
            "is_prompt_len_calibrated": True,
            "machine": {"hostname": socket.gethostname(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "args": vars(args),
        },
        "points": [],
    }
    for index, concurrency in enumerate(args.max_concurrency):
        # seed + point index: the prompts `inferd bench serve` sends at the same sweep point.
        requests = datasets.random_requests(
            args.num_prompts, args.input_len, args.output_len, 0.0, args.seed + index, count_tokens
        )
        load_before = os.getloadavg()[0]
        results: list[RequestResult] = []
        start_s = time.perf_counter()
        for first in range(0, len(requests), concurrency):
            results.extend(run_batch(model, tokenizer, requests[first:first + concurrency]))
        duration_s = time.perf_counter() - start_s
        point = {
            "request_rate": "inf", "max_concurrency": concurrency, "burstiness": 1.0,
            "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
            **compute_metrics(results, duration_s),
        }
        print(format_table(dict(point, request_rate=math.inf), args.label), flush=True)
        result["config"]["args"]["max_concurrency"] = args.max_concurrency
        result["points"].append(point)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.result_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
