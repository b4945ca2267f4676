"""Layer 5: what every route of one app shares: options, the engine once loaded, metrics, drain state."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from inferd.engine.async_engine import AsyncEngine
from inferd.server.errors import APIError
from inferd.server.metrics import FinishedRequestStats, ServerMetrics

request_logger = logging.getLogger("inferd.requests")

# The guard middleware stamps each HTTP request's arrival (time.monotonic()) into its ASGI scope under this key.
ARRIVAL_TIME_SCOPE_KEY = "inferd.arrival_time"
DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_QUEUE = 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Logprobs must be JSON numbers; -inf (an impossible token) is reported as this, as OpenAI-compatible servers do.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class ServerOptions:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting (not yet running) beyond this get 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    retry_after_s: int = 1


class ServerState:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = ServerMetrics(options.served_model_name)
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.is_draining = False
        self.num_in_flight = 0  # HTTP requests inside the app (streams count until their last byte)
        self._token_texts: dict[int, str] = {}

    @property
    def served_model_name(self) -> str:
        return self.options.served_model_name

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_running and not self.is_draining

    def require_engine(self) -> AsyncEngine:
        if self.is_draining:
            raise APIError(503, "server is shutting down", code="shutting_down")
        if self.load_error is not None:
            raise APIError(503, f"model failed to load: {self.load_error}", code="model_load_failed")
        if self.engine is None:
            raise APIError(503, "model is still loading; retry shortly", code="model_loading", headers={"Retry-After": "1"})
        if not self.engine.is_running:
            raise APIError(503, "engine is not running", code="engine_stopped")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_queue(self, engine: AsyncEngine, num_new_requests: int) -> None:
        num_waiting = engine.num_waiting_requests()
        if num_waiting + num_new_requests > self.options.max_queue:
            raise APIError(
                429,
                f"server is busy: {num_waiting} requests are waiting (max_queue {self.options.max_queue}); retry later",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.options.retry_after_s)},
            )

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (special tokens kept), cached per id."""
        text = self._token_texts.get(token_id)
        if text is None:
            assert self.engine is not None
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def record_request(self, request_id: str, stats: FinishedRequestStats, status: str, duration_s: float) -> None:
        self.metrics.observe_finished_request(stats)
        log_request(request_id, stats, status, duration_s)


def log_request(request_id: str, stats: FinishedRequestStats, status: str, duration_s: float) -> None:
    """One JSON line per request (to the `inferd.requests` logger)."""
    if not request_logger.isEnabledFor(logging.INFO):
        return
    line: dict[str, Any] = {
        "event": "request",
        "id": request_id,
        "status": status,
        "prompt_tokens": stats.num_prompt_tokens,
        "output_tokens": stats.num_generation_tokens,
        "cached_tokens": stats.num_cached_tokens,
        "ttft_s": None if stats.time_to_first_token_s is None else round(stats.time_to_first_token_s, 6),
        "duration_s": round(duration_s, 6),
        "finish_reasons": stats.finish_reasons,
    }
    request_logger.info(json.dumps(line))
