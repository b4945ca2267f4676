"""Per-request timings -> the benchmark's summary: latency percentiles, throughputs, goodput, failures.

Pure arithmetic on plain data (no HTTP, no clock), so the tests can feed it synthetic timestamps.

Definitions (all per request, over successful requests):
- TTFT: seconds from sending the request to the first chunk that carries output text.
- ITL: the gaps between consecutive text chunks, pooled over all requests (a chunk may hold several tokens).
- TPOT: (E2E - TTFT) / (output_tokens - 1); undefined for a single output token, so those requests are left out.
- E2E: seconds from sending the request to the end of its stream.
Percentiles are numpy's default (linear interpolation between closest ranks). Reports are in milliseconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCY_NAMES = ("ttft", "tpot", "itl", "e2el")
SLO_NAMES = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What one request produced; timings in seconds from the moment it was sent."""

    is_success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    # From the server's `usage`; False when the server sent none and output_tokens counts text chunks instead.
    has_usage: bool = False
    requested_output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_text: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def parse_goodput_slos(specs: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos_ms: dict[str, float] = {}
    for spec in specs or ():
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if name == "e2e":
            name = "e2el"
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"goodput SLO {spec!r}: expected NAME:MS with NAME one of ttft, tpot, e2el")
        try:
            slos_ms[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {spec!r}: {value!r} is not a number of milliseconds") from None
        if slos_ms[name] <= 0:
            raise ValueError(f"goodput SLO {spec!r}: must be > 0 ms")
    return slos_ms


def is_within_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    values_ms = {
        "ttft": result.ttft_s * 1000.0,
        # A one-token answer has no decode phase: nothing to miss.
        "tpot": (result.tpot_s or 0.0) * 1000.0,
        "e2el": result.e2e_s * 1000.0,
    }
    return all(values_ms[name] <= limit_ms for name, limit_ms in slos_ms.items())


def summarize_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / median / p90 / p99 / std of seconds, in ms; None for each when there are no values."""
    keys = ["mean", "median", "std"] + [f"p{p}" for p in PERCENTILES if p != 50]
    if len(values_s) == 0:
        return {key: None for key in keys}
    values_ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    summary: dict[str, float | None] = {
        "mean": float(values_ms.mean()),
        "median": float(np.percentile(values_ms, 50)),
        "std": float(values_ms.std()),
    }
    for p in PERCENTILES:
        if p != 50:
            summary[f"p{p}"] = float(np.percentile(values_ms, p))
    return summary


def compute_metrics(
    results: Sequence[RequestResult], duration_s: float, goodput_slos_ms: dict[str, float] | None = None
) -> dict[str, Any]:
    """The summary of one benchmark run as a flat JSON-ready dict (see the module docstring for definitions)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    successes = [r for r in results if r.is_success]
    failures = [r for r in results if not r.is_success]
    total_prompt_tokens = sum(r.prompt_tokens for r in successes)
    total_output_tokens = sum(r.output_tokens for r in successes)

    latencies_s = {
        "ttft": [r.ttft_s for r in successes],
        "tpot": [r.tpot_s for r in successes if r.tpot_s is not None],
        "itl": [gap_s for r in successes for gap_s in r.itl_s],
        "e2el": [r.e2e_s for r in successes],
    }
    metrics: dict[str, Any] = {
        "duration_s": duration_s,
        "num_requests": len(results),
        "completed": len(successes),
        "failed": len(failures),
        "errors": dict(Counter(r.error for r in failures).most_common()),
        "num_without_usage": sum(1 for r in successes if not r.has_usage),
        # Requests whose output length differs from max_tokens: a server ignoring `ignore_eos` shows up here.
        "num_output_len_mismatch": sum(
            1 for r in successes if r.requested_output_tokens and r.output_tokens != r.requested_output_tokens
        ),
        "total_input_tokens": total_prompt_tokens,
        "total_output_tokens": total_output_tokens,
        "mean_input_tokens": total_prompt_tokens / len(successes) if successes else None,
        "mean_output_tokens": total_output_tokens / len(successes) if successes else None,
        "request_throughput": len(successes) / duration_s,
        "output_throughput": total_output_tokens / duration_s,
        "total_token_throughput": (total_prompt_tokens + total_output_tokens) / duration_s,
        "goodput_slos_ms": dict(goodput_slos_ms or {}),
        "goodput": None,
    }
    if goodput_slos_ms:
        num_good = sum(1 for r in successes if is_within_slos(r, goodput_slos_ms))
        metrics["goodput"] = num_good / duration_s
    for name, values_s in latencies_s.items():
        for stat, value in summarize_ms(values_s).items():
            metrics[f"{stat}_{name}_ms"] = value
    return metrics
