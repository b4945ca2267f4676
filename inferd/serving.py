"""Layer 0: the seam between the server and every kind of model it serves.

The server holds a model table: served name -> (kind, engine). It only ever calls the `ServedEngine` protocol
below (lifecycle, readiness, abort, stats); each kind's routes call that kind's own submit method:

    kind       engine (layer 4)                          submit                                     routes
    generate   inferd.engine.async_engine.AsyncEngine    add_request(...) -> RequestStream          /v1/chat/completions, /v1/completions
    embed      inferd.embeddings.AsyncEmbedEngine        await embed(token_id_lists) -> [n, dim]    /v1/embeddings
    tabular    inferd.tabular (ONNX)                     await infer(inputs) -> outputs              /v2/models/{name}/infer

Every method of the protocol is called on the server's event-loop thread.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class ModelKind(str, enum.Enum):
    GENERATE = "generate"  # autoregressive LLMs (chat, completion)
    EMBED = "embed"  # encoders that map text to one vector
    TABULAR = "tabular"  # classical models over feature rows (ONNX)

    @classmethod
    def parse(cls, value: str, field_name: str = "kind") -> ModelKind:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{field_name} must be one of {[k.value for k in cls]}, got {value!r}") from None


@runtime_checkable
class ServedEngine(Protocol):
    """What the model table needs from an engine of any kind."""

    kind: ModelKind

    def start(self) -> None:
        """Start the engine's worker thread(s); requests may be submitted afterwards."""

    def shutdown(self) -> None:
        """Stop the worker thread(s); requests still in flight fail with an error. Idempotent."""

    @property
    def is_running(self) -> bool:
        """True between start() and shutdown() while the worker is alive."""

    def abort(self, request_id: str) -> None:
        """Drop a request (its client went away); unknown or finished ids are ignored."""

    def get_stats(self) -> Any:
        """A plain-data snapshot of the engine's gauges and cumulative counters (server/metrics.py reads it)."""


@dataclass(frozen=True)
class ModelSpec:
    """One model the server should serve, as the user wrote it (a repeated --model flag or a models file entry).

    `source` is a catalog name, a local path (HF directory, .gguf, .onnx) or a store source string; `kind` None
    means infer it from the source (catalog task, config.json architectures, sentence-transformers files).
    `options` are per-kind settings (LLM engine flags, embedding batching limits), validated by that kind.
    """

    name: str
    source: str
    kind: ModelKind | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    # sha256 of the model's files as the store verified them (None: a path outside the store); the response
    # cache keys answers by it (server/response_cache.py), beside a fingerprint of the files taken at load.
    content_digest: str | None = None
