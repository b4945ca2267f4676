"""Layer 5: turns plain engine and request statistics into Prometheus series.

The ONLY module that imports prometheus_client. Each app owns its own CollectorRegistry, so two apps in one
process (tests, benchmarks) never share or clash over series. Every series carries the label `model_name`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds. Latency buckets span a fast GPU decode step (ms) to a long CPU request (minutes).
_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5
)
_REQUEST_BUCKETS_S = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class FinishedRequestStats:
    """What one request contributes to the metrics once it ends; times in seconds, None when not reached."""

    num_prompt_tokens: int
    num_generation_tokens: int  # all n completions together
    num_cached_tokens: int
    finish_reasons: list[str]  # one per completion: "stop" | "length" | "abort"
    time_to_first_token_s: float | None
    queue_time_s: float | None
    e2e_latency_s: float | None
    time_per_output_token_s: float | None


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:  # exported as NAME_total
            return Counter(name, doc, labels, registry=r).labels(model_name)

        self._ttft = histogram(
            "inferd:time_to_first_token_seconds", "Time from arrival to the first output token.", _TTFT_BUCKETS_S
        )
        self._itl = histogram(
            "inferd:inter_token_latency_seconds", "Time between successive outputs of a request.", _TOKEN_BUCKETS_S
        )
        self._tpot = histogram(
            "inferd:time_per_output_token_seconds", "Mean time per output token after the first.", _TOKEN_BUCKETS_S
        )
        self._e2e = histogram(
            "inferd:e2e_request_latency_seconds", "Time from arrival to the last output.", _REQUEST_BUCKETS_S
        )
        self._queue = histogram(
            "inferd:request_queue_time_seconds", "Time from arrival to first scheduled.", _REQUEST_BUCKETS_S
        )
        self._num_running = gauge("inferd:num_requests_running", "Requests in the running batch.")
        self._num_waiting = gauge("inferd:num_requests_waiting", "Requests waiting to be scheduled.")
        self._kv_usage = gauge("inferd:kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1).")
        self._prompt_tokens = counter("inferd:prompt_tokens", "Prompt tokens scheduled (computed or cached).")
        self._generation_tokens = counter("inferd:generation_tokens", "Tokens generated, aborted requests' included.")
        self._prefix_queries = counter("inferd:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self._prefix_hits = counter("inferd:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._success = Counter(
            "inferd:request_success", "Finished completions by finish reason.", ["model_name", "finished_reason"], registry=r
        )
        # The engine's token counters are cumulative; each Prometheus counter advances by the difference since the
        # previous read, keyed by the EngineStats field it mirrors.
        self._engine_counters = {
            "num_prompt_tokens": self._prompt_tokens,
            "num_generation_tokens": self._generation_tokens,
            "num_prefix_cache_queries_tokens": self._prefix_queries,
            "num_prefix_cache_hits_tokens": self._prefix_hits,
        }
        self._last_engine_counts = dict.fromkeys(self._engine_counters, 0)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def observe_finished_request(self, stats: FinishedRequestStats) -> None:
        for reason in stats.finish_reasons:
            self._success.labels(self.model_name, reason).inc()
        for histogram, value in (
            (self._ttft, stats.time_to_first_token_s),
            (self._queue, stats.queue_time_s),
            (self._e2e, stats.e2e_latency_s),
            (self._tpot, stats.time_per_output_token_s),
        ):
            if value is not None:
                histogram.observe(max(value, 0.0))

    def set_engine_stats(self, stats: Any) -> None:
        """`stats`: the engine's EngineStats (gauges, and cumulative token counters)."""
        self._num_running.set(stats.num_running)
        self._num_waiting.set(stats.num_waiting)
        self._kv_usage.set(stats.kv_cache_usage)
        for field_name, counter in self._engine_counters.items():
            count = getattr(stats, field_name)
            counter.inc(max(count - self._last_engine_counts[field_name], 0))
            self._last_engine_counts[field_name] = count

    def render(self) -> bytes:
        return generate_latest(self.registry)
