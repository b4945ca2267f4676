"""Markdown table of a comparison run: one row per (server, concurrency), medians over repeats.

    python benchmarks/peers/results_table.py RUN_DIR   (RUN_DIR holds SERVER.rN.json files and commands.txt)
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's inferd, as compare.sh runs
from inferd.kernels import cpu_flags_summary  # noqa: E402  the flags the kernels choose their path from

FILE_RE = re.compile(r"^(?P<server>.+)\.r(?P<repeat>\d+)\.json$")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "?"


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def build_table(run_dir: Path) -> str:
    # (server, concurrency) -> one point per repeat
    points_by_key: dict[tuple[str, int], list[dict]] = defaultdict(list)
    servers: list[str] = []
    first_config: dict = {}
    for path in sorted(run_dir.glob("*.r*.json")):
        match = FILE_RE.match(path.name)
        if not match:
            continue
        result = json.loads(path.read_text())
        first_config = first_config or result["config"]
        server = match["server"]
        if server not in servers:
            servers.append(server)
        for point in result["points"]:
            points_by_key[(server, point["max_concurrency"])].append(point)
    busy_path = run_dir / "busy.txt"
    commands_path = run_dir / "commands.txt"
    args = first_config.get("args", {})
    lines = [
        f"## {first_config.get('date', '?')[:10]} serving comparison",
        "",
        f"- machine: {platform.node()}, {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"{memory_gib()}, {platform.platform()}; CPU flags that pick kernel paths: {cpu_flags_summary()}",
        f"- workload: random prompts of {args.get('input_len')} tokens, {args.get('output_len')} output tokens "
        f"(ignore_eos), {args.get('num_prompts')} requests per point, all sent at once, capped by concurrency; "
        "weights from the same Q4_1 GGUF: its own Q4_1/Q8_0 blocks for `inferd` and `llamacpp-q4`, dequantized "
        "to fp32 for `inferd-fp32`, `llamacpp`, `vllm` and `transformers`",
        f"- medians over {max((len(v) for v in points_by_key.values()), default=0)} repeats "
        "(servers alternated); tok/s range = min..max over repeats",
    ]
    if busy_path.exists():
        lines.append(f"- CPU busy % before each run (quiet check): {busy_path.read_text().split()}")
    lines += [
        "",
        "| server | concurrency | output tok/s | tok/s range | median TTFT ms | median TPOT ms | p99 TPOT ms "
        "| failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server in servers:
        for concurrency in sorted({c for s, c in points_by_key if s == server}):
            points = points_by_key[(server, concurrency)]
            throughputs = [p["output_throughput"] for p in points]
            lines.append(
                f"| {server} | {concurrency} | {fmt(statistics.median(throughputs))} "
                f"| {fmt(min(throughputs))}..{fmt(max(throughputs))} "
                f"| {fmt(median_or_none([p['median_ttft_ms'] for p in points]))} "
                f"| {fmt(median_or_none([p['median_tpot_ms'] for p in points]))} "
                f"| {fmt(median_or_none([p['p99_tpot_ms'] for p in points]))} "
                f"| {sum(p['failed'] for p in points)} |"
            )
    if commands_path.exists():
        lines += ["", "Commands:", "", "```", commands_path.read_text().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(build_table(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
