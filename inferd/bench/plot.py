"""Latency-vs-throughput charts of bench result files (matplotlib, imported lazily: it is an optional extra)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_result(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    if not isinstance(result, dict) or "points" not in result:
        raise ValueError(f"{path}: not an `inferd bench serve` result file (no 'points')")
    return result


def target_label(result: dict[str, Any]) -> str:
    config = result.get("config", {})
    return config.get("label") or f"{config.get('model', '?')} @ {config.get('base_url', '?')}"


def point_label(point: dict[str, Any]) -> str:
    if point.get("max_concurrency") is not None:
        return f"c={point['max_concurrency']}"
    return f"r={point.get('request_rate')}"


def require_matplotlib() -> None:
    """Fail at once, before a benchmark runs, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plot: matplotlib is not installed; install it with `pip install 'inferd[bench]'` "
                         "(or `pip install matplotlib`)") from None


def plot_results(results: Sequence[dict[str, Any]], out_path: str | Path) -> None:
    """One line per result (target): output tok/s on x; p50 (solid) and p99 (dashed) TTFT and TPOT on y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for result in results:
        label = target_label(result)
        points = [p for p in result["points"] if p.get("completed")]
        throughputs = [p["output_throughput"] for p in points]
        for ax, name in zip(axes, ("ttft", "tpot")):
            medians = [p[f"median_{name}_ms"] for p in points]
            p99s = [p[f"p99_{name}_ms"] for p in points]
            (line,) = ax.plot(throughputs, medians, marker="o", label=f"{label} p50")
            ax.plot(throughputs, p99s, marker="x", linestyle="--", color=line.get_color(), label=f"{label} p99")
            for x, y, point in zip(throughputs, medians, points):
                if y is not None:
                    ax.annotate(point_label(point), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, title in zip(axes, ("time to first token", "time per output token")):
        ax.set_title(title)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    first_config = results[0].get("config", {}) if results else {}
    fig.suptitle(f"{first_config.get('model', '')}  {first_config.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
