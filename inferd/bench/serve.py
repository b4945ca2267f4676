"""`inferd bench serve`: load-test any OpenAI-compatible server; `inferd bench plot`: overlay result files.

Layer 6 (outside): this tool never imports torch or the engine, it only speaks HTTP (through `client.py`), so it
measures inferd, vLLM, SGLang and llama.cpp the same way.

One run = one or more points (a comma list in --request-rate or --max-concurrency is a sweep). Each point sends
its own seeded workload (seed + point index, so a prefix cache never serves one point's prompts to the next),
paced by a gamma arrival process and capped by a semaphore, then prints a table. The result JSON holds the
config echo and every point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from inferd.bench import datasets
from inferd.bench.arrivals import arrival_gaps_s
from inferd.bench.metrics import RequestResult, compute_metrics, parse_goodput_slos

# Added to --seed for the warmup prompt, so it never equals a measured prompt.
WARMUP_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class SweepPoint:
    request_rate: float
    max_concurrency: int | None


def parse_request_rates(text: str) -> list[float]:
    rates = []
    for item in text.split(","):
        rate = float(item)  # float("inf") parses "inf"
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {item!r}")
        rates.append(rate)
    return rates


def parse_concurrencies(text: str) -> list[int]:
    values = [int(item) for item in text.split(",")]
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"max concurrency must be >= 1, got {text!r}")
    return values


def sweep_points(request_rates: list[float], max_concurrencies: list[int] | None) -> list[SweepPoint]:
    if len(request_rates) > 1 and max_concurrencies is not None and len(max_concurrencies) > 1:
        raise ValueError("sweep either --request-rate or --max-concurrency, not both")
    concurrencies: list[int | None] = list(max_concurrencies) if max_concurrencies else [None]
    return [SweepPoint(rate, concurrency) for rate in request_rates for concurrency in concurrencies]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a /v1 is ok)")
    target.add_argument("--model", default=None, help="model name sent in requests (default: first of /v1/models)")
    target.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    target.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY); never saved")
    target.add_argument("--label", default=None, help="name of this target in tables and plots, e.g. llama.cpp")
    target.add_argument("--request-timeout-s", type=float, default=600.0)

    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--dataset", default="random", help="random | prefix-repetition | path to a .jsonl of {prompt|messages}"
    )
    workload.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    workload.add_argument("--output-len", type=int, default=128, help="output tokens per request (max_tokens)")
    workload.add_argument(
        "--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1-R)..len*(1+R); 0 = fixed"
    )
    workload.add_argument("--prefix-len", type=int, default=None, help="prefix-repetition: shared prefix tokens")
    workload.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: distinct prefixes")
    workload.add_argument("--num-prompts", type=int, default=100)
    workload.add_argument("--seed", type=int, default=0)
    workload.add_argument(
        "--no-ignore-eos", dest="is_ignore_eos", action="store_false",
        help="do not send ignore_eos (for servers that reject it); output lengths then vary",
    )
    workload.add_argument(
        "--no-tokenize", dest="is_tokenize", action="store_false",
        help="do not calibrate prompt lengths with the server's /tokenize",
    )
    workload.add_argument("--extra-body", default=None, help='JSON merged into each request, e.g. {"top_p": 0.9}')

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=parse_request_rates, default=[math.inf],
        help="requests/s (Poisson), 'inf' = all at once; a comma list sweeps",
    )
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    load.add_argument(
        "--max-concurrency", type=parse_concurrencies, default=None,
        help="cap on requests in flight; a comma list sweeps",
    )
    load.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first")

    report = parser.add_argument_group("report")
    report.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50")
    report.add_argument("--result-json", default=None, help="write all points and the config here")
    report.add_argument("--plot", default=None, help="draw latency vs throughput to this PNG (needs matplotlib)")
    report.add_argument("--disable-tqdm", action="store_true")


def build_requests(
    args: argparse.Namespace, seed: int, count_tokens: datasets.TokenCounter | None
) -> list[datasets.BenchRequest]:
    if args.dataset == "random":
        return datasets.random_requests(
            args.num_prompts, args.input_len, args.output_len, args.range_ratio, seed, count_tokens
        )
    if args.dataset == "prefix-repetition":
        prefix_len = args.prefix_len if args.prefix_len is not None else args.input_len // 2
        if not 0 < prefix_len < args.input_len:
            raise ValueError(f"--prefix-len must be in (0, --input-len={args.input_len}), got {prefix_len}")
        return datasets.prefix_repetition_requests(
            args.num_prompts, prefix_len, args.input_len - prefix_len, args.num_prefixes, args.output_len, seed,
            count_tokens,
        )
    return datasets.file_requests(args.dataset, args.num_prompts, args.output_len)


async def run_point(
    client: Any,
    requests: Sequence[datasets.BenchRequest],
    point: SweepPoint,
    burstiness: float,
    seed: int,
    is_progress_shown: bool,
) -> tuple[list[RequestResult], float]:
    """Send `requests` on the point's schedule; returns their results (in order) and the run's wall seconds."""
    from tqdm import tqdm

    gaps_s = arrival_gaps_s(len(requests), point.request_rate, burstiness, seed)
    semaphore = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
    progress = tqdm(
        total=len(requests), file=sys.stderr, disable=not is_progress_shown, desc=describe_point(point), unit="req"
    )

    async def send(request: datasets.BenchRequest) -> RequestResult:
        if semaphore is None:
            result = await client.send(request)
        else:
            async with semaphore:
                result = await client.send(request)
        progress.update(1)
        return result

    start_s = time.perf_counter()
    # Sleep to absolute send times (start + cumulative gaps) so scheduling overhead does not lower the rate.
    send_at_s = start_s
    tasks = []
    for request, gap_s in zip(requests, gaps_s):
        send_at_s += gap_s
        delay_s = send_at_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(send(request)))
    results = await asyncio.gather(*tasks)
    duration_s = time.perf_counter() - start_s
    progress.close()
    return list(results), duration_s


def describe_point(point: SweepPoint) -> str:
    rate = "inf" if math.isinf(point.request_rate) else f"{point.request_rate:g}"
    concurrency = "-" if point.max_concurrency is None else str(point.max_concurrency)
    return f"rate={rate} conc={concurrency}"


def load_average_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def redacted_command(argv: Sequence[str]) -> str:
    """The command line as typed, with the value of --api-key replaced, so result files hold no secret."""
    program = os.path.basename(argv[0]) if argv else ""
    words = ["python -m inferd.bench"] if program == "__main__.py" else [program]
    is_secret_next = False
    for word in argv[1:]:
        if is_secret_next:
            word, is_secret_next = "REDACTED", False
        elif word == "--api-key":
            is_secret_next = True
        elif word.startswith("--api-key="):
            word = "--api-key=REDACTED"
        words.append(shlex.quote(word))
    return " ".join(words)


def config_echo(args: argparse.Namespace, model: str, is_calibrated: bool) -> dict[str, Any]:
    arg_values = {
        key: (value if not isinstance(value, float) or math.isfinite(value) else "inf")
        for key, value in vars(args).items()
        if key not in ("api_key", "func") and not callable(value)
    }
    arg_values["request_rate"] = ["inf" if math.isinf(r) else r for r in args.request_rate]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_url": args.base_url,
        "model": model,
        "endpoint": args.endpoint,
        "label": args.label,
        "dataset": args.dataset,
        "is_prompt_len_calibrated": is_calibrated,
        "machine": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "command": redacted_command(sys.argv),
        "args": arg_values,
    }


def format_table(point: dict[str, Any], label: str) -> str:
    def value(key: str, fmt: str = "{:.2f}") -> str:
        raw = point.get(key)
        return "n/a" if raw is None else fmt.format(raw)

    rows = [
        ("Successful requests", value("completed", "{}")),
        ("Failed requests", value("failed", "{}")),
        ("Benchmark duration (s)", value("duration_s")),
        ("Total input tokens", value("total_input_tokens", "{}")),
        ("Total generated tokens", value("total_output_tokens", "{}")),
        ("Request throughput (req/s)", value("request_throughput")),
        ("Output token throughput (tok/s)", value("output_throughput")),
        ("Total token throughput (tok/s)", value("total_token_throughput")),
    ]
    if point.get("goodput_slos_ms"):
        slos = " ".join(f"{k}<={v:g}ms" for k, v in point["goodput_slos_ms"].items())
        rows.append((f"Goodput (req/s, {slos})", value("goodput")))
    lines = [f"{'=' * 20} {label} {describe_point(SweepPoint(point['request_rate'], point['max_concurrency']))} "
             f"{'=' * 20}"]
    lines += [f"{name:<44}{text:>12}" for name, text in rows]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 16} {title} {'-' * 16}")
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms)':<44}{value(f'{stat}_{name}_ms'):>12}")
    if point.get("num_output_len_mismatch"):
        lines.append(f"WARNING: {point['num_output_len_mismatch']} requests returned a different number of tokens "
                     "than max_tokens (server ignores ignore_eos?)")
    if point.get("num_without_usage"):
        lines.append(f"WARNING: {point['num_without_usage']} streams had no usage; their output tokens are "
                     "counted as text chunks")
    for error, count in point.get("errors", {}).items():
        lines.append(f"FAILED x{count}: {error}")
    return "\n".join(lines)


async def run_serve_async(args: argparse.Namespace) -> dict[str, Any]:
    from inferd.bench.client import OpenAIStreamClient, TokenizeEndpoint, fetch_first_model_name

    slos_ms = parse_goodput_slos(args.goodput)
    points = sweep_points(args.request_rate, args.max_concurrency)
    extra_body = json.loads(args.extra_body) if args.extra_body else {}
    model = args.model or fetch_first_model_name(args.base_url, args.api_key)
    label = args.label or model

    counter = None
    if args.is_tokenize and not datasets.is_file_dataset(args.dataset):
        counter = TokenizeEndpoint.open(args.base_url, model, args.api_key)
        if counter is None:
            print("note: no /tokenize on the server; prompt lengths are estimates (usage still counts tokens)",
                  file=sys.stderr)
    try:
        workloads = [build_requests(args, args.seed + index, counter) for index in range(len(points))]
    finally:
        if counter is not None:
            counter.close()

    if args.endpoint == "completions" and any(r.prompt is None for requests in workloads for r in requests):
        raise ValueError(f"{args.dataset} has chat messages: use --endpoint chat")

    result: dict[str, Any] = {"config": config_echo(args, model, counter is not None), "points": []}
    client = OpenAIStreamClient(
        args.base_url, model, args.endpoint, args.api_key, args.is_ignore_eos, extra_body, args.request_timeout_s
    )
    async with client:
        warmup_len = min(args.input_len, 32)
        for warmup in datasets.random_requests(args.num_warmups, warmup_len, 4, seed=args.seed + WARMUP_SEED_OFFSET):
            warmup_result = await client.send(warmup)
            if not warmup_result.is_success:
                raise RuntimeError(f"warmup request failed, is the server up? {warmup_result.error}")
        for index, (point, requests) in enumerate(zip(points, workloads)):
            load_before = load_average_1m()
            results, duration_s = await run_point(
                client, requests, point, args.burstiness, args.seed + index, not args.disable_tqdm
            )
            summary = {
                "request_rate": "inf" if math.isinf(point.request_rate) else point.request_rate,
                "max_concurrency": point.max_concurrency,
                "burstiness": args.burstiness,
                "load_avg_1m_before": load_before,
                "load_avg_1m_after": load_average_1m(),
                **compute_metrics(results, duration_s, slos_ms),
            }
            summary_for_table = dict(summary, request_rate=point.request_rate)
            print(format_table(summary_for_table, label), flush=True)
            result["points"].append(summary)
    return result


def run_serve_command(args: argparse.Namespace) -> int:
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if args.dataset not in datasets.DATASET_NAMES and not os.path.isfile(args.dataset):
        print(f"error: --dataset {args.dataset!r} is neither {' nor '.join(datasets.DATASET_NAMES)} nor a file",
              file=sys.stderr)
        return 2
    if args.plot:
        from inferd.bench.plot import require_matplotlib

        try:
            require_matplotlib()
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(run_serve_async(args))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
        print(f"wrote {args.result_json}", file=sys.stderr)
    if args.plot:
        from inferd.bench.plot import plot_results

        plot_results([result], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(point["completed"] > 0 for point in result["points"]) else 1


def run_plot_command(args: argparse.Namespace) -> int:
    from inferd.bench.plot import load_result, plot_results, require_matplotlib

    try:
        require_matplotlib()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    plot_results([load_result(path) for path in args.results], args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench serve` and `bench plot` on a CLI's subparsers; each sets `func(args) -> exit code`."""
    bench = subparsers.add_parser("bench", help="benchmark any OpenAI-compatible server over HTTP")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    serve = bench_commands.add_parser(
        "serve", help="load-test a server: latency percentiles, throughput, goodput",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve_command)
    plot = bench_commands.add_parser("plot", help="overlay result files: one line per target")
    plot.add_argument("results", nargs="+", help="result JSON files of `inferd bench serve`")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.set_defaults(func=run_plot_command)
    return bench


add_parser = add_bench_parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m inferd.bench serve|plot ...` (the same as `inferd bench serve|plot ...`)."""
    parser = argparse.ArgumentParser(prog="inferd")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
