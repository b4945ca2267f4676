"""Layer 5: turns plain engine and request statistics into Prometheus series.

The ONLY module that imports prometheus_client. Each app owns its own CollectorRegistry, so two apps in one
process (tests, benchmarks) never share or clash over series. Every series carries the label `model_name`
(vLLM's convention), one per served model.
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

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BATCH_COST_BUCKETS = (1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

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


class LLMMetrics:
    """The series of one `generate` model: its children of the shared families, bound to its model_name."""

    def __init__(self, families: dict[str, Any], model_name: str) -> None:
        self.model_name = model_name
        f = families
        self._ttft = f["ttft"].labels(model_name)
        self._itl = f["itl"].labels(model_name)
        self._tpot = f["tpot"].labels(model_name)
        self._e2e = f["e2e"].labels(model_name)
        self._queue = f["queue"].labels(model_name)
        self._num_running = f["num_running"].labels(model_name)
        self._num_waiting = f["num_waiting"].labels(model_name)
        self._kv_usage = f["kv_usage"].labels(model_name)
        self._success = f["success"]
        # The engine's token counters are cumulative; each Prometheus counter advances by the difference since the
        # previous read, keyed by the EngineStats field it mirrors.
        self._engine_counters = {
            "num_prompt_tokens": f["prompt_tokens"].labels(model_name),
            "num_generation_tokens": f["generation_tokens"].labels(model_name),
            "num_prefix_cache_queries_tokens": f["prefix_queries"].labels(model_name),
            "num_prefix_cache_hits_tokens": f["prefix_hits"].labels(model_name),
            "num_spec_draft_tokens": f["spec_draft_tokens"].labels(model_name),
            "num_spec_accepted_tokens": f["spec_accepted_tokens"].labels(model_name),
            "num_spec_verify_steps": f["spec_drafts"].labels(model_name),
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
            count = getattr(stats, field_name, 0)
            counter.inc(max(count - self._last_engine_counts[field_name], 0))
            self._last_engine_counts[field_name] = count


class ServerMetrics:
    """Every series of one app. LLM series are vLLM's set under `inferd:`; models of the batched kinds (embed,
    tabular) share request / batch series (Triton's ideas: queue time, compute time, batch size) with a `kind`
    label beside `model_name`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        m = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: list[str] = m) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, m, registry=r)

        def counter(name: str, doc: str, labels: list[str] = m) -> Any:  # exported as NAME_total
            return Counter(name, doc, labels, registry=r)

        self._families = {
            "ttft": histogram("inferd:time_to_first_token_seconds", "Time from arrival to the first output token.",
                              _TTFT_BUCKETS_S),
            "itl": histogram("inferd:inter_token_latency_seconds", "Time between successive outputs of a request.",
                             _TOKEN_BUCKETS_S),
            "tpot": histogram("inferd:time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TOKEN_BUCKETS_S),
            "e2e": histogram("inferd:e2e_request_latency_seconds", "Time from arrival to the last output.",
                             _REQUEST_BUCKETS_S),
            "queue": histogram("inferd:request_queue_time_seconds", "Time from arrival to first scheduled.",
                               _REQUEST_BUCKETS_S),
            "num_running": gauge("inferd:num_requests_running", "Requests in the running batch."),
            "num_waiting": gauge("inferd:num_requests_waiting", "Requests waiting to be scheduled."),
            "kv_usage": gauge("inferd:kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)."),
            "prompt_tokens": counter("inferd:prompt_tokens", "Prompt tokens scheduled (computed or cached)."),
            "generation_tokens": counter("inferd:generation_tokens", "Tokens generated, aborted requests' included."),
            "prefix_queries": counter("inferd:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            "prefix_hits": counter("inferd:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
            # Speculative decoding, vLLM's names: mean acceptance length = 1 + accepted / drafts.
            "spec_draft_tokens": counter("inferd:spec_decode_num_draft_tokens", "Tokens proposed for verification."),
            "spec_accepted_tokens": counter("inferd:spec_decode_num_accepted_tokens", "Proposed tokens accepted."),
            "spec_drafts": counter("inferd:spec_decode_num_drafts", "Verify steps of requests with proposals."),
            "success": counter("inferd:request_success", "Finished completions by finish reason.",
                               ["model_name", "finished_reason"]),
        }
        kind_labels = ["model_name", "kind"]
        self._requests = counter("inferd:requests", "Requests answered, by status (ok, error, aborted).",
                                 ["model_name", "kind", "status"])
        self._request_duration = histogram("inferd:request_duration_seconds",
                                           "Time from arrival to the answer (embed, tabular).", _TTFT_BUCKETS_S,
                                           kind_labels)
        self._request_items = counter("inferd:request_items", "Inputs answered (texts, rows).", kind_labels)
        self._request_tokens = counter("inferd:request_tokens", "Input tokens processed (embed).", kind_labels)
        # (model, kind, status) -> (requests, duration, items children, kind name) for observe_request
        self._request_children: dict[tuple[str, Any, str], tuple[Any, Any, Any, str]] = {}
        self._batch_queue = histogram("inferd:batch_queue_time_seconds",
                                      "Per input: time from submit to the start of its batch.", _TTFT_BUCKETS_S,
                                      kind_labels)
        self._batch_compute = histogram("inferd:batch_compute_time_seconds", "Time one batch ran the model.",
                                        _TTFT_BUCKETS_S, kind_labels)
        self._batch_size = histogram("inferd:batch_size", "Inputs per batch.", _BATCH_SIZE_BUCKETS, kind_labels)
        self._batch_cost = histogram("inferd:batch_tokens", "Cost per batch (tokens for embed, rows for tabular).",
                                     _BATCH_COST_BUCKETS, kind_labels)
        self._model_load = histogram("inferd:model_load_seconds", "Time to load a model (startup or after keep-alive).",
                                     _REQUEST_BUCKETS_S)
        self._model_loaded = gauge("inferd:model_loaded", "1 while the model is in memory, 0 when unloaded.")
        # The exact response cache (server/response_cache.py); embeddings count inputs, the other endpoints requests.
        cache_labels = ["model_name", "endpoint"]
        self._response_cache_hits = counter("inferd:response_cache_hits", "Answers given from the response cache.",
                                            cache_labels)
        self._response_cache_misses = counter("inferd:response_cache_misses",
                                              "Cacheable answers not found in the response cache.", cache_labels)
        self._response_cache_bytes = gauge("inferd:response_cache_bytes", "Bytes the response cache holds.")
        self._llm: dict[str, LLMMetrics] = {}

    def llm(self, model_name: str) -> LLMMetrics:
        metrics = self._llm.get(model_name)
        if metrics is None:
            metrics = self._llm[model_name] = LLMMetrics(self._families, model_name)
        return metrics

    def observe_batch(self, model_name: str, kind: Any, record: Any) -> None:
        """`record`: an inferd.batching.BatchRecord (called on the batcher's worker thread; the client is thread-safe)."""
        labels = (model_name, str(getattr(kind, "value", kind)))
        queue = self._batch_queue.labels(*labels)
        for seconds in record.queue_times_s:
            queue.observe(max(seconds, 0.0))
        self._batch_compute.labels(*labels).observe(record.compute_time_s)
        self._batch_size.labels(*labels).observe(record.num_items)
        self._batch_cost.labels(*labels).observe(record.cost)

    def observe_request(self, model_name: str, kind: Any, status: str, duration_s: float, num_items: int,
                        num_tokens: int = 0) -> None:
        key = (model_name, kind, status)
        children = self._request_children.get(key)
        if children is None:  # .labels() costs a lock and a dict walk per call: once per label set instead
            kind_name = str(getattr(kind, "value", kind))
            children = self._request_children[key] = (
                self._requests.labels(model_name, kind_name, status),
                self._request_duration.labels(model_name, kind_name),
                self._request_items.labels(model_name, kind_name),
                kind_name,
            )
        requests, duration, items, kind_name = children
        requests.inc()
        duration.observe(max(duration_s, 0.0))
        items.inc(num_items)
        if num_tokens:
            self._request_tokens.labels(model_name, kind_name).inc(num_tokens)

    def observe_model_load(self, model_name: str, seconds: float) -> None:
        self._model_load.labels(model_name).observe(seconds)

    def set_model_loaded(self, model_name: str, is_loaded: bool) -> None:
        self._model_loaded.labels(model_name).set(1.0 if is_loaded else 0.0)

    def observe_response_cache(self, model_name: str, endpoint: str, num_hits: int, num_misses: int) -> None:
        if num_hits:
            self._response_cache_hits.labels(model_name, endpoint).inc(num_hits)
        if num_misses:
            self._response_cache_misses.labels(model_name, endpoint).inc(num_misses)

    def set_response_cache_bytes(self, model_name: str, num_bytes: int) -> None:
        self._response_cache_bytes.labels(model_name).set(num_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def read_samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Every sample of the registry as plain data, read from the collector objects (no text exposition):
        sample name (`inferd:prompt_tokens_total`, `..._bucket`) -> [(labels, value)]. Series other modules
        register later (e.g. `inferd:response_cache_hits_total`) appear here by name."""
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        return samples
