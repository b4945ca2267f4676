"""Layer 5: the exact response cache. Deterministic answers are kept and given again to the same request.

What is cached:
- /v1/chat/completions and /v1/completions: the whole answer of a deterministic request (temperature 0, or a
  seed given), non-stream as its JSON body, a stream as its SSE events (a stream and a non-stream request never
  share an entry: `stream` is part of the key, since the chunking of a stream is not derivable from the answer).
  A hit gets the same body, the same events in the same order, with a fresh `id` and `created`.
- /v1/embeddings: one full-dimension float32 vector per input's token ids (after truncation), so a request whose
  inputs were partly seen computes only the others; `dimensions` and `encoding_format` are applied on the way out.

Key: sha256 over (endpoint, a keyed hash of the caller's bearer token, the model's identity, the request). The
request part is the canonical JSON (sorted keys, no spaces) of the raw body without `model` (the resolved served
name is in the identity), `user` and `cache` (they do not change the answer); every other field, unknown or
future ones included, is part of the key, so a field this module never heard of can only cause a miss. The
model's identity: the served name, the store's sha256 of the artifact when the store recorded one, a fingerprint
of every file of the model (relative path, size, mtime, inode; full contents for files up to 16 MiB: configs,
tokenizers, templates) and the resolved engine settings (quantization, dtype, device, ...); it is computed once
per loaded engine, so a reload with other weights or settings never meets the old entries.

Only complete, successful answers are stored (an error, a disconnect or an abort stores nothing). The cache is an
LRU bounded by bytes: the memory of the stored objects (sys.getsizeof of the answer's one template string or the
vector, and of the key) plus a fixed per-entry overhead for the entry and its slot in the LRU.
Per request `"cache": false` bypasses it (no lookup, no store); `--response-cache-bytes 0` turns it off.
Responses carry `x-inferd-cache: hit|miss` when the request was looked up (embeddings: `hit` when every input
came from the cache, `partial`, or `miss`), and hits a `server-timing: cache;dur=MS` (arrival to answer).
Metrics (server/metrics.py): inferd:response_cache_hits_total / _misses_total {model_name, endpoint} (embeddings
count inputs), inferd:response_cache_bytes {model_name}.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response

logger = logging.getLogger("inferd.server")
request_logger = logging.getLogger("inferd.requests")

DEFAULT_RESPONSE_CACHE_BYTES = 64 << 20
CACHE_HEADER = "x-inferd-cache"
# The entry object, its answer object and its OrderedDict slot (CPython 3.12: ~56 + ~56 + ~100 bytes), rounded up.
_ENTRY_OVERHEAD_BYTES = 256
# Files of a model up to this size are hashed in full (configs, tokenizers, chat templates); bigger ones (weights)
# by relative path, size, mtime and inode.
_HASHED_FILE_MAX_BYTES = 16 << 20
# Bodies this large are canonicalised on a worker thread, like the routes' tokenizing.
_CANONICAL_IN_THREAD_MIN_BYTES = 64 << 10
# Body fields that never change the answer (`model` is replaced by the served model's identity).
_FIELDS_NOT_IN_KEY = frozenset({"model", "user", "cache", "keep_alive"})
# Finish reasons of an answer that did not complete.
_INCOMPLETE_FINISH_REASONS = frozenset({None, "abort", "error"})
# The head every chat/completions body and chunk starts with (protocol field order: id, object, created, ...).
_HEAD_RE = re.compile(r'\{"id":"((?:[^"\\]|\\.)*)","object":("(?:[^"\\]|\\.)*"),"created":\d+,')
_SSE_DATA = "data: "


def _json_dumps(value: Any) -> str:
    """As FastAPI's JSONResponse renders a body."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------- model identity


def _settings_of(engine: Any) -> Any:
    """The resolved settings of a loaded engine that can change its output (LLM: EngineConfig; embed: its options,
    device and dtype), as JSON-able data."""
    parts: dict[str, Any] = {"type": type(engine).__name__}
    for name in ("config", "options"):
        value = getattr(engine, name, None)
        if value is not None and is_dataclass(value):
            parts[name] = asdict(value)
    model = getattr(engine, "model", None)
    for name in ("device", "dtype", "dimension", "max_seq_length"):
        value = getattr(model, name, None)
        if value is not None:
            parts[f"model.{name}"] = str(value)
    return parts


def model_fingerprint(source: str | os.PathLike) -> str:
    """sha256 over every file of a model (a file, or a folder's files in path order): small files by content,
    big ones by (relative path, size, mtime_ns, inode). Changes when any file is replaced or rewritten."""
    root = Path(source)
    files = [(root.name, root)] if root.is_file() else sorted(
        (p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()
    )
    digest = hashlib.sha256()
    for relative, path in files:
        stat = path.stat()
        digest.update(f"{relative}\0{stat.st_size}\0".encode())
        if stat.st_size <= _HASHED_FILE_MAX_BYTES:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(f"{stat.st_mtime_ns}\0{stat.st_ino}\0".encode())
    return digest.hexdigest()


def model_identity(served: Any) -> bytes:
    """sha256 of what makes a loaded model answer as it does (see the module docstring)."""
    spec = served.spec
    try:
        fingerprint = model_fingerprint(spec.source) if Path(spec.source).exists() else "absent"
    except OSError as exc:  # unreadable: a per-load random identity, so nothing is ever shared across loads
        logger.warning("response cache: cannot fingerprint %s (%s); entries live until the model reloads", spec.source, exc)
        fingerprint = secrets.token_hex(16)
    document = {
        "name": spec.name,
        "source": str(spec.source),
        "content_digest": getattr(spec, "content_digest", None),
        "fingerprint": fingerprint,
        "settings": _settings_of(served.engine),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).digest()


# ---------------------------------------------------------------------------------------------- entries


# Marks where a head goes in an answer's template: JSON text never holds a raw NUL (json.dumps escapes it).
_HEAD_MARK = "\x00"


@dataclass
class _Answer:
    """A chat/completions answer: its body, or all its SSE events, as one template string in which every head
    (id, object, created) was cut out and replaced by _HEAD_MARK, so a hit puts a fresh one in."""

    object_json: str  # the "object" member's JSON string
    id_prefix: str  # "chatcmpl" / "cmpl"
    template: str
    is_stream: bool
    num_prompt_tokens: int
    num_completion_tokens: int

    @property
    def num_bytes(self) -> int:
        return sys.getsizeof(self.template) + sys.getsizeof(self.object_json) + sys.getsizeof(self.id_prefix)

    def render(self) -> tuple[str, str]:
        """(new id, body text) with a fresh id and created."""
        new_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        head = f'{{"id":"{new_id}","object":{self.object_json},"created":{int(time.time())},'
        return new_id, self.template.replace(_HEAD_MARK, head)


def _split_head(text: str) -> tuple[str, str, str] | None:
    """(id, object JSON, rest) of a body or chunk starting with the standard head, else None."""
    match = _HEAD_RE.match(text)
    if match is None:
        return None
    return match.group(1), match.group(2), text[match.end():]


@dataclass
class _Entry:
    model_name: str
    value: _Answer | np.ndarray
    num_bytes: int


# ---------------------------------------------------------------------------------------------- the cache


class ResponseCache:
    """One server's exact response cache: an LRU over `_Entry`s bounded by `capacity_bytes` (0: off)."""

    def __init__(self, capacity_bytes: int, metrics: Any = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"response_cache_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.metrics = metrics  # ServerMetrics, or None
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self.num_bytes = 0
        self._num_bytes_by_model: dict[str, int] = {}
        self._identities: dict[str, tuple[Any, bytes]] = {}  # model name -> (engine, identity)
        self._token_key = secrets.token_bytes(32)  # API keys are hashed with it; never stored in clear

    @property
    def is_enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    # ---- LRU

    def get(self, key: bytes) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, model_name: str, value: _Answer | np.ndarray) -> bool:
        """Store (replacing an entry of the same key); evicts least recently used entries to fit. False when the
        entry alone is larger than the capacity."""
        value_bytes = value.num_bytes if isinstance(value, _Answer) else sys.getsizeof(value)
        num_bytes = value_bytes + sys.getsizeof(key) + _ENTRY_OVERHEAD_BYTES
        if num_bytes > self.capacity_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._account(old, -1)
        while self.num_bytes + num_bytes > self.capacity_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._account(evicted, -1)
        entry = _Entry(model_name, value, num_bytes)
        self._entries[key] = entry
        self._account(entry, 1)
        return True

    def _account(self, entry: _Entry, sign: int) -> None:
        self.num_bytes += sign * entry.num_bytes
        model_bytes = self._num_bytes_by_model.get(entry.model_name, 0) + sign * entry.num_bytes
        self._num_bytes_by_model[entry.model_name] = model_bytes
        if self.metrics is not None:
            self.metrics.set_response_cache_bytes(entry.model_name, model_bytes)

    def _count(self, model_name: str, endpoint: str, num_hits: int, num_misses: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_response_cache(model_name, endpoint, num_hits, num_misses)

    def stats(self) -> dict[str, Any]:
        """Plain data for a dashboard: capacity, bytes and entries in all, bytes per model."""
        return {"capacity_bytes": self.capacity_bytes, "bytes": self.num_bytes, "entries": len(self._entries),
                "bytes_by_model": dict(self._num_bytes_by_model)}

    # ---- keys

    def _token_hash(self, request: Request) -> bytes:
        """A keyed hash of the bearer token (empty when none was sent): the namespace of one API key."""
        authorization = request.headers.get("authorization", "")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else authorization
        return hmac.new(self._token_key, token.encode(), hashlib.sha256).digest()

    async def _identity(self, served: Any) -> bytes:
        engine = served.engine
        known = self._identities.get(served.name)
        if known is not None and known[0] is engine:
            return known[1]
        identity = await asyncio.to_thread(model_identity, served)
        self._identities[served.name] = (engine, identity)
        return identity

    async def _namespace(self, request: Request, served: Any, endpoint: str) -> Any:
        """A sha256 object over (endpoint, caller, model identity); copy() it per key."""
        digest = hashlib.sha256()
        for part in (endpoint.encode(), self._token_hash(request), await self._identity(served)):
            digest.update(len(part).to_bytes(4, "little"))
            digest.update(part)
        return digest

    # ---- chat and completions

    async def lookup_generate(self, request: Request, served: Any, body: Any, endpoint: str) -> GenerateLookup:
        """Before any engine work: a hit's response, or a handle that stores the answer once it is complete."""
        is_deterministic = body.temperature == 0 or body.seed is not None
        if not (self.is_enabled and body.cache and is_deterministic):
            return GenerateLookup(self, None, served.name, endpoint, None)
        raw = await request.body()
        if len(raw) >= _CANONICAL_IN_THREAD_MIN_BYTES:
            canonical = await asyncio.to_thread(_canonical_body, raw)
        else:
            canonical = _canonical_body(raw)
        digest = await self._namespace(request, served, endpoint)
        digest.update(canonical)
        key = digest.digest()
        entry = self.get(key)
        if entry is None:
            self._count(served.name, endpoint, 0, 1)
            return GenerateLookup(self, key, served.name, endpoint, None)
        self._count(served.name, endpoint, 1, 0)
        answer = entry.value
        assert isinstance(answer, _Answer)
        new_id, text = answer.render()
        arrival_time = request.scope.get("inferd.arrival_time")
        headers = {CACHE_HEADER: "hit"}
        if arrival_time is not None:
            elapsed_s = time.monotonic() - arrival_time
            headers["server-timing"] = f"cache;dur={elapsed_s * 1000:.3f}"
            _log_hit(served.name, new_id, answer, elapsed_s)
        if answer.is_stream:
            headers["Cache-Control"] = "no-cache"
            response = Response(content=text, media_type="text/event-stream", headers=headers)
        else:
            response = Response(content=text, media_type="application/json", headers=headers)
        return GenerateLookup(self, key, served.name, endpoint, response)

    # ---- embeddings

    async def embed(
        self,
        request: Request,
        served: Any,
        body: Any,
        token_id_lists: Sequence[Sequence[int]],
        compute: Callable[[list[Sequence[int]]], Awaitable[np.ndarray]],
        endpoint: str = "/v1/embeddings",
    ) -> tuple[np.ndarray, str | None]:
        """float32 [n, dimension] for the inputs, computing (`compute`, the engine's embed) only the inputs not in
        the cache, each distinct one once; and the x-inferd-cache value (None when not looked up). Vectors are
        stored only after `compute` returned."""
        if not (self.is_enabled and body.cache):
            return await compute(list(token_id_lists)), None
        namespace = await self._namespace(request, served, endpoint)
        keys = []
        for ids in token_id_lists:
            digest = namespace.copy()
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            keys.append(digest.digest())
        found: dict[bytes, np.ndarray] = {}
        missing: dict[bytes, int] = {}  # key -> first input index needing it
        for index, key in enumerate(keys):
            entry = self.get(key)
            if entry is not None:
                found[key] = entry.value  # type: ignore[assignment]
            elif key not in missing:
                missing[key] = index
        num_hits = sum(1 for key in keys if key in found)
        self._count(served.name, endpoint, num_hits, len(keys) - num_hits)
        if missing:
            computed = await compute([token_id_lists[i] for i in missing.values()])
            for row, key in enumerate(missing):
                vector = np.array(computed[row], dtype=np.float32)  # a copy: the batch array is not kept alive
                vector.setflags(write=False)
                found[key] = vector
                self.put(key, served.name, vector)
        vectors = np.stack([found[key] for key in keys]).astype(np.float32, copy=False)
        status = "hit" if num_hits == len(keys) else "miss" if num_hits == 0 else "partial"
        return vectors, status


class GenerateLookup:
    """The outcome of `lookup_generate`: `response` is a hit's answer; otherwise `key` (None: not cacheable) is
    where the complete answer goes."""

    def __init__(self, cache: ResponseCache, key: bytes | None, model_name: str, endpoint: str,
                 response: Response | None) -> None:
        self.cache = cache
        self.key = key
        self.model_name = model_name
        self.endpoint = endpoint
        self.response = response

    def stream(self, events: AsyncIterator[str], is_complete: Callable[[], bool]) -> AsyncIterator[str]:
        """`events` passed through; when they end and `is_complete()` (every engine request finished well), they
        are stored. A disconnect closes the generator before its end, so nothing is stored then."""
        if self.key is None:
            return events
        return self._recorded(events, is_complete)

    async def _recorded(self, events: AsyncIterator[str], is_complete: Callable[[], bool]) -> AsyncIterator[str]:
        recorded: list[str] = []
        try:
            async for event in events:
                recorded.append(event)
                yield event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        if is_complete():
            self._store_events(recorded)

    def _store_events(self, events: list[str]) -> None:
        assert self.key is not None
        parts: list[str] = []
        num_heads = 0
        object_json = id_prefix = None
        num_prompt_tokens = num_completion_tokens = 0
        for event in events:
            if '"error":' in event and event.startswith(f'{_SSE_DATA}{{"error"'):
                return  # an error event: not a complete answer
            split = _split_head(event[len(_SSE_DATA):]) if event.startswith(_SSE_DATA) else None
            if split is None:
                parts.append(event)
                continue
            old_id, object_json, rest = split
            id_prefix = old_id.rpartition("-")[0] or old_id
            parts.append(f"{_SSE_DATA}{_HEAD_MARK}{rest}")
            num_heads += 1
            if '"usage":{' in rest:
                usage = json.loads(event[len(_SSE_DATA):]).get("usage") or {}
                num_prompt_tokens = usage.get("prompt_tokens", 0)
                num_completion_tokens = usage.get("completion_tokens", 0)
        if object_json is None or id_prefix is None or not events or events[-1] != f"{_SSE_DATA}[DONE]\n\n":
            return
        template = "".join(parts)
        if template.count(_HEAD_MARK) != num_heads:
            return  # a NUL where only heads should be: not stored
        answer = _Answer(object_json, id_prefix, template, True, num_prompt_tokens, num_completion_tokens)
        self.cache.put(self.key, self.model_name, answer)

    def respond(self, response: Any) -> Any:
        """A complete non-stream answer (a pydantic response): stored, and returned as JSON with the miss header;
        unchanged when not cacheable."""
        if self.key is None:
            return response
        document = response.model_dump(mode="json")
        text = _json_dumps(document)
        choices = document.get("choices") or []
        is_complete = bool(choices) and all(c.get("finish_reason") not in _INCOMPLETE_FINISH_REASONS for c in choices)
        split = _split_head(text)
        if is_complete and split is not None:
            old_id, object_json, rest = split
            usage = document.get("usage") or {}
            if _HEAD_MARK not in rest:
                answer = _Answer(object_json, old_id.rpartition("-")[0] or old_id, _HEAD_MARK + rest, False,
                                 usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                self.cache.put(self.key, self.model_name, answer)
        return Response(content=text, media_type="application/json", headers={CACHE_HEADER: "miss"})

    def tag(self, response: Response) -> Response:
        """The miss header on a streaming response (when the request was looked up)."""
        if self.key is not None:
            response.headers[CACHE_HEADER] = "miss"
        return response


def _canonical_body(raw: bytes) -> bytes:
    """The request's fields that change the answer as canonical JSON (sorted keys, no spaces) bytes."""
    document = json.loads(raw)
    if isinstance(document, dict):
        document = {k: v for k, v in document.items() if k not in _FIELDS_NOT_IN_KEY}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _log_hit(model_name: str, request_id: str, answer: _Answer, duration_s: float) -> None:
    """The request's JSON log line (inferd.requests), as an engine request logs one."""
    if not request_logger.isEnabledFor(logging.INFO):
        return
    request_logger.info(json.dumps({
        "event": "request", "id": request_id, "model": model_name, "status": "cache_hit",
        "prompt_tokens": answer.num_prompt_tokens, "output_tokens": answer.num_completion_tokens,
        "cached_tokens": 0, "ttft_s": None, "duration_s": round(duration_s, 6), "finish_reasons": [],
    }))
