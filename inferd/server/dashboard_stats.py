"""Layer 5: the live dashboard's statistics: once a second, read the server's own Prometheus series (the registry
objects, through `ServerMetrics.read_samples`, never the text exposition) and keep per-model time series in a ring
buffer of `MAX_NUM_SAMPLES` seconds.

Per sample and model (None where there is nothing to show, e.g. no request finished in the window):
- generate: TTFT and TPOT p50/p90/p99 (ms) of requests that finished in the last `WINDOW_S` seconds, estimated
  from histogram bucket deltas with linear interpolation inside a bucket (Prometheus' `histogram_quantile`, so
  as coarse as the buckets); prompt and generated tokens/s over the last second; running and waiting requests and
  KV-cache use (%) at the sample; prefix-cache hit rate (%) of prompt tokens looked up in the window; response-cache
  hit rate (%) from `inferd:response_cache_hits_total` / `_misses_total` when those series exist.
- embed and tabular: requests/s (every status) and inputs/s over the last second.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("inferd.server")

SAMPLE_PERIOD_S = 1.0
MAX_NUM_SAMPLES = 600  # ten minutes at one sample a second
WINDOW_S = 10  # samples (seconds) the latency percentiles and cache hit rates look back over
QUANTILES = (50, 90, 99)

Samples = dict[str, list[tuple[dict[str, str], float]]]
# Per model: histogram name -> cumulative bucket counts in bucket order; counter name -> value; gauge name -> value.
_HISTOGRAMS = {"ttft": "inferd:time_to_first_token_seconds", "tpot": "inferd:time_per_output_token_seconds"}
_COUNTERS = {
    "prompt_tokens": "inferd:prompt_tokens_total",
    "generation_tokens": "inferd:generation_tokens_total",
    "prefix_queries": "inferd:prefix_cache_queries_total",
    "prefix_hits": "inferd:prefix_cache_hits_total",
    "response_cache_hits": "inferd:response_cache_hits_total",
    "response_cache_misses": "inferd:response_cache_misses_total",
    "requests": "inferd:requests_total",
    "request_items": "inferd:request_items_total",
}
_GAUGES = {"num_running": "inferd:num_requests_running", "num_waiting": "inferd:num_requests_waiting",
           "kv_cache_usage": "inferd:kv_cache_usage_ratio"}
GENERATE_SERIES = tuple(f"{name}_p{q}_ms" for name in _HISTOGRAMS for q in QUANTILES) + (
    "prompt_tokens_per_s", "generation_tokens_per_s", "num_running", "num_waiting", "kv_cache_usage_pct",
    "prefix_cache_hit_pct", "response_cache_hit_pct")
BATCHED_SERIES = ("requests_per_s", "items_per_s")


def histogram_quantile(quantile: float, upper_bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The `quantile` (0..1) of observations counted in cumulative `counts` per bucket `upper_bounds` (ascending,
    the last +inf); linear inside the bucket; None when there are no observations."""
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = quantile * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in zip(upper_bounds, counts):
        if count >= rank and count > previous_count:
            if math.isinf(bound):
                return previous_bound  # above the largest finite bucket: its bound is all that is known
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def _by_model(samples: Samples, name: str) -> dict[str, float]:
    """Sum of a series' samples per model_name (other labels, e.g. status or kind, summed over)."""
    values: dict[str, float] = {}
    for labels, value in samples.get(name, ()):
        model = labels.get("model_name", "")
        values[model] = values.get(model, 0.0) + value
    return values


def _buckets_by_model(samples: Samples, name: str) -> dict[str, tuple[list[float], list[float]]]:
    """model_name -> (upper bounds, cumulative counts), ordered by bound."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for labels, value in samples.get(f"{name}_bucket", ()):
        pairs.setdefault(labels.get("model_name", ""), []).append((float(labels["le"]), value))
    return {model: ([b for b, _ in sorted(p)], [c for _, c in sorted(p)]) for model, p in pairs.items()}


class RawSample:
    """What one read of the registry keeps per model: cumulative counters and bucket counts, gauge values."""

    def __init__(self, time_s: float, samples: Samples) -> None:
        self.time_s = time_s
        self.counters = {key: _by_model(samples, name) for key, name in _COUNTERS.items()}
        self.has_response_cache = "inferd:response_cache_hits_total" in samples
        self.gauges = {key: _by_model(samples, name) for key, name in _GAUGES.items()}
        self.buckets = {key: _buckets_by_model(samples, name) for key, name in _HISTOGRAMS.items()}

    def counter(self, key: str, model: str) -> float:
        counts = self.counters[key]
        # A response cache counted server-wide (no model_name label) is shown for every model.
        return counts.get(model, counts.get("", 0.0))


def _rate(new: RawSample, old: RawSample, key: str, model: str) -> float | None:
    elapsed_s = new.time_s - old.time_s
    if elapsed_s <= 0:
        return None
    return max(new.counter(key, model) - old.counter(key, model), 0.0) / elapsed_s


def _hit_pct(new: RawSample, old: RawSample, hits_key: str, total_keys: Sequence[str], model: str) -> float | None:
    hits = new.counter(hits_key, model) - old.counter(hits_key, model)
    total = sum(new.counter(k, model) - old.counter(k, model) for k in total_keys)
    return None if total <= 0 else 100.0 * hits / total


def derive(model: str, kind: str, new: RawSample, previous: RawSample | None, window_start: RawSample | None
           ) -> dict[str, float | None]:
    """One point of every series of `model` at `new`; `previous` is the sample one period earlier,
    `window_start` the one WINDOW_S earlier (or the oldest kept)."""
    if kind != "generate":
        return {"requests_per_s": None if previous is None else _rate(new, previous, "requests", model),
                "items_per_s": None if previous is None else _rate(new, previous, "request_items", model)}
    point: dict[str, float | None] = dict.fromkeys(GENERATE_SERIES)
    for name in _HISTOGRAMS:
        bounds, counts = new.buckets[name].get(model, ([], []))
        if window_start is not None and bounds:
            _, old_counts = window_start.buckets[name].get(model, (bounds, [0.0] * len(bounds)))
            counts = [c - o for c, o in zip(counts, old_counts)]
        else:
            counts = []
        for q in QUANTILES:
            seconds = histogram_quantile(q / 100.0, bounds, counts) if counts else None
            point[f"{name}_p{q}_ms"] = None if seconds is None else seconds * 1000.0
    if previous is not None:
        point["prompt_tokens_per_s"] = _rate(new, previous, "prompt_tokens", model)
        point["generation_tokens_per_s"] = _rate(new, previous, "generation_tokens", model)
    point["num_running"] = new.gauges["num_running"].get(model)
    point["num_waiting"] = new.gauges["num_waiting"].get(model)
    usage = new.gauges["kv_cache_usage"].get(model)
    point["kv_cache_usage_pct"] = None if usage is None else 100.0 * usage
    if window_start is not None:
        point["prefix_cache_hit_pct"] = _hit_pct(new, window_start, "prefix_hits", ("prefix_queries",), model)
        if new.has_response_cache:
            point["response_cache_hit_pct"] = _hit_pct(
                new, window_start, "response_cache_hits", ("response_cache_hits", "response_cache_misses"), model)
    return point


class DashboardStats:
    """The ring buffer behind /dashboard/data: one column (deque) per model and series, all as long as the time
    column; `sample()` is called once a second on the server's event loop."""

    def __init__(self, state: Any, max_num_samples: int = MAX_NUM_SAMPLES) -> None:
        self.state = state
        self.max_num_samples = max_num_samples
        self._raw: deque[RawSample] = deque(maxlen=WINDOW_S + 1)
        self._times_s: deque[float] = deque(maxlen=max_num_samples)
        self._columns: dict[str, dict[str, deque[float | None]]] = {}  # model -> series -> values
        self.has_response_cache = False

    def _model_columns(self, name: str, kind: str) -> dict[str, deque[float | None]]:
        columns = self._columns.get(name)
        if columns is None:
            # A model that joins later (loaded after the first sample) starts with gaps.
            series_names = GENERATE_SERIES if kind == "generate" else BATCHED_SERIES
            columns = self._columns[name] = {
                series: deque([None] * len(self._times_s), maxlen=self.max_num_samples) for series in series_names}
        return columns

    def sample(self) -> None:
        state = self.state
        state.refresh_engine_metrics()
        raw = RawSample(time.time(), state.metrics.read_samples())
        self._raw.append(raw)
        previous = self._raw[-2] if len(self._raw) > 1 else None
        window_start = self._raw[0] if len(self._raw) > 1 else None
        self.has_response_cache = raw.has_response_cache
        points = {name: (served.kind.value, derive(name, served.kind.value, raw, previous, window_start))
                  for name, served in state.models.items()}
        for name, (kind, _) in points.items():
            self._model_columns(name, kind)
        self._times_s.append(round(raw.time_s, 3))
        for name, columns in self._columns.items():
            point = points.get(name, (None, {}))[1]
            for series, column in columns.items():
                value = point.get(series)
                column.append(None if value is None else round(value, 3))

    def to_json(self, since_s: float | None = None) -> dict[str, Any]:
        """Columns per model of the kept samples newer than `since_s` (all when None): {"t": [unix s], series: [...]}."""
        start = 0 if since_s is None else bisect.bisect_right(list(self._times_s), since_s)
        models_json = {}
        for name, served in self.state.models.items():
            columns = self._model_columns(name, served.kind.value)
            models_json[name] = {
                "kind": served.kind.value,
                "status": served.describe()["status"],
                "series": {series: list(itertools.islice(column, start, None)) for series, column in columns.items()},
            }
        return {"sample_period_s": SAMPLE_PERIOD_S, "window_s": WINDOW_S, "max_num_samples": self.max_num_samples,
                "has_response_cache": self.has_response_cache, "t": list(itertools.islice(self._times_s, start, None)),
                "models": models_json}

    async def run(self) -> None:
        """Sample every SAMPLE_PERIOD_S until cancelled (next tick on the clock, so a slow sample does not drift)."""
        next_s = time.monotonic()
        while True:
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the dashboard must never take the server down
                logger.exception("dashboard: sampling the metrics failed")
            next_s += SAMPLE_PERIOD_S
            await asyncio.sleep(max(next_s - time.monotonic(), 0.0))


def start_sampler(state: Any) -> tuple[DashboardStats, asyncio.Task]:
    stats = DashboardStats(state)
    return stats, asyncio.create_task(stats.run())
