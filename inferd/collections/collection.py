"""Persistent vector collections: a write-ahead log in front of an in-memory index, snapshotted now and then.

On disk, one directory per collection under `$INFERD_HOME/collections/`:

    NAME/collection.json       name, dimension, metric, model (written once, atomically, at create)
    NAME/snapshot-G/           state as of generation G: items.jsonl ([key, id, metadata, text] per line),
                               the index (exact: keys.npy + vectors.npy; hnsw: index.usearch), state.json
    NAME/wal-G.log             every upsert/delete since snapshot G (wal.py framing), fsync'd before the answer

Durability: `upsert` and `delete` append one record (the whole batch) to the log and fsync it before they touch
memory or return, so an acknowledged write survives `kill -9`. Compaction writes snapshot G+1 into a `.tmp`
directory, fsyncs it, renames it into place, starts wal-(G+1).log and only then removes generation G; a crash
at any point leaves either G (+ its log) or G+1 complete, and loading picks the newest complete snapshot.

Index: two parts, both searched by every query and merged by score.
  - `flat` (ExactIndex, numpy): every vector while the collection holds at most `exact_max_vectors` of them
    (exact search is as fast as the graph there: `benchmarks/vector_index.py --crossover`); past that, only the
    vectors not yet in the graph.
  - `graph` (HnswIndex, usearch), from the first time the collection grows past `exact_max_vectors`: a
    background indexer thread moves vectors from `flat` into it in chunks. An upsert is acknowledged once its log
    record is on disk and its vectors are in `flat`, so bulk loads run at log speed, not graph-insert speed,
    and every acknowledged vector is searchable at once (exactly, until the indexer reaches it).
Filtered queries are answered exactly over the keys that match the filter when there are few of them, else by
the graph with oversampling (deeper, then exact, when it returns too few matches): `_search_subset`.

Threading: public methods take the collection's lock (`_lock`) and are called from worker threads, not the
event loop, except `query(wait=False)`, which takes both locks only if they are free and otherwise returns None
at once (the server's event loop calls it). Every call into the graph also takes `_graph_lock`: usearch's
Python index is not safe to read (search, get, memory_usage) while another thread inserts (a server segfaulted
that way in the HTTP benchmark). The indexer inserts a chunk holding only `_graph_lock`, so upserts and exact work go on meanwhile, and a
query waits at most one chunk's insert time. Lock order: `_lock` before `_graph_lock`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.collections.filters import FilterError, MetadataIndex, parse_filter
from inferd.collections.index import METRICS, ExactIndex, HnswIndex, limit_blas_threads, require_usearch, top_k
from inferd.collections.wal import WriteAheadLog, fsync_dir

logger = logging.getLogger("inferd.collections")

# Below this many vectors a query scans them all (exact, and faster than the graph at this size on our 2-core
# machines: benchmarks/vector_index.py --crossover). The graph is built when a collection grows past it.
DEFAULT_EXACT_MAX_VECTORS = 10_000
# Compact (snapshot + new log) when the log grows past max(this, the last snapshot's size).
DEFAULT_COMPACT_WAL_BYTES = 256 << 20
MAX_K = 1000
# Largest k of a query answered without waiting (`query(wait=False)`): a graph search stays ~1 ms up to here.
MAX_QUICK_K = 100
# A filtered query with many matches asks the graph for this many times k / (fraction of items matching)
# neighbours (`_search_subset`).
FILTER_OVERSAMPLING = 5
# A filtered query counts as quick (`query(wait=False)`) up to this many graph neighbours (~2-3 ms at 100k on
# 2 cores) or this many matches scored exactly (~2 ms).
QUICK_FILTER_FETCH = 500
QUICK_FILTER_MATCHES = 500
# Vectors the indexer moves from `flat` into the graph per step (tens of ms of graph inserts on 2 quiet cores;
# a query waits for the step in progress).
INDEXER_CHUNK = 128
# Backpressure: an upsert waits while this many vectors are not in the graph yet (150 MiB of float32 at 384-d),
# so a bulk load faster than the indexer cannot hold a second, float32 copy of the collection in memory.
MAX_UNINDEXED_VECTORS = 100_000
MAX_DIMENSION = 16384
MAX_ID_CHARS = 512
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d+)$")
_JSON_LEN = struct.Struct("<I")


class CollectionError(Exception):
    status_code = 500

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(CollectionError, ValueError):
    status_code = 400


class NotFoundError(CollectionError):
    status_code = 404


class ConflictError(CollectionError):
    status_code = 409


def collections_root() -> Path:
    """$INFERD_COLLECTIONS_DIR if set, else $INFERD_HOME/collections (INFERD_HOME defaults to ~/.cache/inferd)."""
    if os.environ.get("INFERD_COLLECTIONS_DIR"):
        return Path(os.environ["INFERD_COLLECTIONS_DIR"]).expanduser()
    home = os.environ.get("INFERD_HOME") or Path.home() / ".cache" / "inferd"
    return Path(home).expanduser() / "collections"


@dataclass(frozen=True)
class CollectionConfig:
    name: str
    dimension: int
    metric: str  # cosine | dot | l2
    model: str | None = None  # the embedding model that turns text into vectors; None: vectors only
    created_at: float = 0.0


@dataclass
class Item:
    id: str
    vector: np.ndarray | None = None  # [dim] float32; None until a text item is embedded
    metadata: dict[str, Any] | None = None
    text: str | None = None


@dataclass(frozen=True)
class QueryResult:
    id: str
    score: float  # cosine similarity / dot product (descending), or Euclidean distance for l2 (ascending)
    metadata: dict[str, Any]


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _exact_scores(matrix: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    if metric == "l2":
        diff = matrix - query
        return -np.einsum("ij,ij->i", diff, diff)
    return matrix @ query


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _metadata_json(metadata: Any, param: str = "metadata") -> bytes | None:
    """Compact JSON of an item's metadata object; None for none (or an empty one)."""
    if not metadata:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidRequestError(f"{param} must be a JSON object, got {type(metadata).__name__}", param)
    try:
        return json.dumps(metadata, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{param} must be JSON (objects, lists, strings, finite numbers, booleans, "
                                  f"null): {exc}", param) from None


class Collection:
    def __init__(self, directory: Path, config: CollectionConfig, *, exact_max_vectors: int = DEFAULT_EXACT_MAX_VECTORS,
                 compact_wal_bytes: int = DEFAULT_COMPACT_WAL_BYTES) -> None:
        self.directory = Path(directory)
        self.config = config
        self.exact_max_vectors = exact_max_vectors
        self.compact_wal_bytes = compact_wal_bytes
        self._lock = threading.RLock()
        self._graph_lock = threading.RLock()  # re-entered by a query holding it throughout (wait=False)
        self._work = threading.Condition(self._lock)  # the indexer waits here for vectors in `flat`
        self._flat = ExactIndex(config.dimension, config.metric)
        self._graph: HnswIndex | None = None
        self._indexer: threading.Thread | None = None
        # Per item: one dict entry (id -> key) and two list slots indexed by key (None once the key is dead).
        # Metadata stays as its compact JSON bytes (~50 B for {"group": 3}, against ~230 B as a dict), decoded
        # only for the k results and for filters that postings cannot answer.
        self._key_by_id: dict[str, int] = {}
        self._id_by_key: list[str | None] = []
        self._metadata_json_by_key: list[bytes | None] = []  # None: no metadata (or a dead key)
        self._text_by_key: dict[int, str] = {}
        self._metadata_index = MetadataIndex()
        self._next_key = 0
        self._generation = 0
        self._snapshot_bytes = 0
        self._wal: WriteAheadLog | None = None
        self._is_deleted = False

    # ------------------------------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.config.name

    def __len__(self) -> int:
        return len(self._key_by_id)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            wal_bytes = self._wal.num_bytes if self._wal else 0
            return {
                "name": self.config.name,
                "model": self.config.model,
                "dimension": self.config.dimension,
                "metric": self.config.metric,
                "count": len(self._key_by_id),
                "index": "exact" if self._graph is None else "hnsw",
                "unindexed": 0 if self._graph is None else len(self._flat),  # acknowledged, not yet in the graph
                "index_bytes": self._flat.num_bytes + self._graph_bytes(),
                "disk_bytes": self._snapshot_bytes + wal_bytes,
                "created_at": self.config.created_at,
            }

    def _graph_bytes(self) -> int:
        if self._graph is None:
            return 0
        with self._graph_lock:
            return self._graph.num_bytes

    # ------------------------------------------------------------------------------------------ validation
    def _check_open(self) -> None:
        if self._is_deleted or self._wal is None:
            raise NotFoundError(f"collection {self.config.name!r} was deleted or closed", "name")

    def prepare_vectors(self, vectors: np.ndarray | Sequence[Sequence[float]], param: str,
                        positions: Sequence[int] | None = None) -> np.ndarray:
        """[n, dim] float32, checked (dimension, finite, non-zero for cosine) and normalised for cosine.

        `param` names the request field for error messages; `positions` maps row i to its request position.
        """
        dim = self.config.dimension

        def at(i: int) -> str:
            return param.format(i=positions[i] if positions is not None else i)

        if not (isinstance(vectors, np.ndarray) and vectors.ndim == 2):
            for i, v in enumerate(vectors):
                n = len(v) if hasattr(v, "__len__") else None
                if n != dim:
                    raise InvalidRequestError(f"{at(i)}: expected {dim} numbers (the dimension of collection "
                                              f"{self.config.name!r}), got {'a scalar' if n is None else n}", at(i))
        try:
            with np.errstate(over="ignore"):  # 1e39 becomes inf here and is refused just below
                matrix = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{at(0)}: vectors must be lists of {dim} numbers", at(0)) from None
        if matrix.ndim != 2 or matrix.shape[1] != dim:
            raise InvalidRequestError(f"{at(0)}: expected {dim} numbers per vector, got shape {matrix.shape}", at(0))
        is_finite = np.isfinite(matrix).all(axis=1)
        if not is_finite.all():
            i = int(np.argmin(is_finite))
            raise InvalidRequestError(f"{at(i)}: contains NaN or infinity (or a value too large for float32)", at(i))
        if self.config.metric == "cosine":
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            if (norms == 0).any():
                i = int(np.argmin(norms[:, 0]))
                raise InvalidRequestError(f"{at(i)}: a zero vector has no direction (metric cosine)", at(i))
            matrix = matrix / norms
        return np.ascontiguousarray(matrix, dtype=np.float32)

    @staticmethod
    def _check_id(item_id: Any, param: str) -> str:
        if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ID_CHARS:
            raise InvalidRequestError(f"{param} must be a non-empty string of at most {MAX_ID_CHARS} characters",
                                      param)
        return item_id

    # ------------------------------------------------------------------------------------------ writes
    def upsert(self, items: Sequence[Item]) -> int:
        """Insert or replace items (each with a vector: text is embedded by the caller); durable when it returns."""
        if not items:
            return 0
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            self._check_id(item.id, f"items[{i}].id")
            if item.id in seen:
                raise InvalidRequestError(f"items[{i}].id: {item.id!r} repeats items[{seen[item.id]}].id in one batch",
                                          f"items[{i}].id")
            seen[item.id] = i
            if item.vector is None:
                raise InvalidRequestError(f"items[{i}]: a vector is required", f"items[{i}].vector")
        metadata_jsons = [_metadata_json(item.metadata, f"items[{i}].metadata") for i, item in enumerate(items)]
        vectors = self.prepare_vectors([item.vector for item in items], "items[{i}].vector")
        with self._lock:
            self._check_open()
            while self._graph is not None and len(self._flat) > MAX_UNINDEXED_VECTORS and self._wal is not None:
                self._work.wait()
            self._check_open()
            if self._graph is None and len(self._flat) + len(items) > self.exact_max_vectors:
                try:  # before the log record: a write that cannot be applied must not be logged
                    require_usearch()
                except ImportError as exc:
                    raise CollectionError(str(exc)) from exc
            keys = list(range(self._next_key, self._next_key + len(items)))
            ids, texts = [it.id for it in items], [it.text for it in items]
            # The record's JSON header, with each item's metadata spliced in as the bytes memory keeps.
            header_json = b'{"op":"upsert","keys":%s,"ids":%s,"metadata":[%s],"texts":%s}' % (
                _dumps(keys), _dumps(ids), b",".join(m or b"null" for m in metadata_jsons), _dumps(texts))
            self._log(header_json, vectors)
            self._apply_upsert(keys, ids, [it.metadata for it in items], metadata_jsons, texts, vectors)
            self._maybe_compact()
        return len(items)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete the items with these ids (unknown ids are ignored); returns how many existed."""
        with self._lock:
            self._check_open()
            present = [i for i in dict.fromkeys(ids) if i in self._key_by_id]
            if not present:
                return 0
            self._log(b'{"op":"delete","ids":%s}' % _dumps(present), None)
            self._apply_delete(present)
            self._maybe_compact()
            return len(present)

    def _log(self, header_json: bytes, vectors: np.ndarray | None) -> None:
        payload = _JSON_LEN.pack(len(header_json)) + header_json
        if vectors is not None:
            payload += vectors.tobytes()
        assert self._wal is not None
        self._wal.append(payload)

    def _apply_record(self, payload: bytes) -> None:
        (header_len,) = _JSON_LEN.unpack_from(payload, 0)
        header = json.loads(payload[4:4 + header_len])
        if header["op"] == "upsert":
            vectors = np.frombuffer(payload, dtype=np.float32, offset=4 + header_len).reshape(-1, self.config.dimension)
            metadata = header["metadata"]
            self._apply_upsert(header["keys"], header["ids"], metadata, [_metadata_json(m) for m in metadata],
                               header["texts"], vectors)
        elif header["op"] == "delete":
            self._apply_delete(header["ids"])
        else:
            raise ValueError(f"unknown log record op {header['op']!r}")

    def _apply_upsert(self, keys: list[int], ids: list[str], metadata: list[dict | None],
                      metadata_jsons: list[bytes | None], texts: list[str | None], vectors: np.ndarray) -> None:
        """keys [n] (ascending, above every key so far), ids, metadata (dicts, for the postings) and its JSON."""
        replaced = [self._key_by_id[i] for i in ids if i in self._key_by_id]
        if replaced:
            self._forget(replaced)
        self._flat.add(np.asarray(keys, dtype=np.int64), vectors)
        for row in zip(keys, ids, metadata, metadata_jsons, texts):
            self._remember(*row)
        self._next_key = max(self._next_key, keys[-1] + 1)
        if self._graph is None and len(self._flat) > self.exact_max_vectors:
            logger.info("collection %s: %d vectors, past %d: building an HNSW graph in the background",
                        self.config.name, len(self._flat), self.exact_max_vectors)
            self._graph = HnswIndex(self.config.dimension, self.config.metric)
        if self._graph is not None and self._wal is not None:  # not while replaying the log in open()
            self._start_indexer()
            self._work.notify()

    def _apply_delete(self, ids: list[str]) -> None:
        self._forget([self._key_by_id[i] for i in ids if i in self._key_by_id])

    def _remember(self, key: int, item_id: str, metadata: dict | None, metadata_json: bytes | None,
                  text: str | None) -> None:
        """Index one stored item's id, metadata and text under its key (log replay and snapshot load alike)."""
        self._key_by_id[item_id] = key
        num_missing = key + 1 - len(self._id_by_key)
        if num_missing > 0:  # keys only grow; the slots of keys never used (replaced, deleted) stay None
            self._id_by_key.extend([None] * num_missing)
            self._metadata_json_by_key.extend([None] * num_missing)
        self._id_by_key[key] = item_id
        if metadata_json is not None:
            self._metadata_json_by_key[key] = metadata_json
            self._metadata_index.add(key, metadata)
        if text is not None:
            self._text_by_key[key] = text

    def _forget(self, keys: list[int]) -> None:
        for key in keys:
            if self._flat.has(key):
                self._flat.remove(np.array([key], dtype=np.int64))
        if self._graph is not None:
            # A key can sit in both while the indexer moves it (or in a snapshot taken meanwhile).
            with self._graph_lock:
                keys_array = np.asarray(keys, dtype=np.int64)
                in_graph = keys_array[self._graph.contains(keys_array)]
                if len(in_graph):
                    self._graph.remove(in_graph)
        for key in keys:
            item_id = self._id_by_key[key]
            self._id_by_key[key] = None
            del self._key_by_id[item_id]
            metadata_json = self._metadata_json_by_key[key]
            if metadata_json is not None:
                self._metadata_json_by_key[key] = None
                self._metadata_index.remove(key, json.loads(metadata_json))
            self._text_by_key.pop(key, None)

    def _metadata_of(self, key: int) -> dict[str, Any]:
        metadata_json = self._metadata_json_by_key[key]
        return {} if metadata_json is None else json.loads(metadata_json)

    # ------------------------------------------------------------------------------------------ reads
    def get(self, item_id: str, *, include_vector: bool = True) -> dict[str, Any]:
        with self._lock:
            self._check_open()
            key = self._key_by_id.get(item_id)
            if key is None:
                raise NotFoundError(f"no item {item_id!r} in collection {self.config.name!r}", "id")
            out: dict[str, Any] = {"id": item_id, "metadata": self._metadata_of(key)}
            if key in self._text_by_key:
                out["text"] = self._text_by_key[key]
            if include_vector:
                out["vector"] = self._vectors(np.array([key], dtype=np.int64))[0].tolist()
            return out

    def _vectors(self, keys: np.ndarray) -> np.ndarray:
        """[n, dim] float32 of live keys, from `flat` or the graph (float16 there)."""
        out = np.empty((len(keys), self.config.dimension), dtype=np.float32)
        in_flat = np.array([self._flat.has(k) for k in keys.tolist()], dtype=bool)
        if in_flat.any():
            out[in_flat] = self._flat.get(keys[in_flat])
        if not in_flat.all():
            assert self._graph is not None
            with self._graph_lock:
                out[~in_flat] = self._graph.get(keys[~in_flat])
        return out

    def vector_of(self, item_id: str, param: str = "id") -> np.ndarray:
        with self._lock:
            key = self._key_by_id.get(item_id)
            if key is None:
                raise NotFoundError(f"no item {item_id!r} in collection {self.config.name!r}", param)
            return self._vectors(np.array([key], dtype=np.int64))[0]

    def query(self, vector: np.ndarray | None = None, *, id: str | None = None, k: int = 10,
              filter: Mapping[str, Any] | None = None, exclude: Sequence[str] = (),
              wait: bool = True) -> list[QueryResult] | None:
        """The k best items for a query vector [dim] (raw: checked and normalised here) or an item's own vector.

        Querying by `id` ("more like this") leaves that item itself out of the results.
        `wait=False` answers only a quick query (k <= MAX_QUICK_K, at most `exact_max_vectors` vectors waiting
        for the graph, a filter of equalities / `$in` whose plan is quick: `_filter_fetch`) whose locks are free
        right now, and returns None at once otherwise (or when a writer, an indexer step or a compaction holds
        the locks): the server answers quick queries on its event loop, which must never block, and hands the
        others to a worker thread.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidRequestError(f"k must be an integer from 1 to {MAX_K}, got {k!r}", "k")
        if (vector is None) == (id is None):
            raise InvalidRequestError("give exactly one of vector and id", "vector")
        try:
            conditions = parse_filter(filter)
        except FilterError as e:
            raise InvalidRequestError(str(e), e.param) from None
        if isinstance(exclude, str) or not all(isinstance(x, str) for x in exclude):
            raise InvalidRequestError("exclude must be a list of item ids (strings)", "exclude")
        query = None
        if vector is not None:
            query = self.prepare_vectors(np.asarray(vector, dtype=np.float32)[None, :]
                                         if np.ndim(vector) == 1 else vector, "vector")[0]
        if wait:
            with self._lock:
                return self._query_locked(query, id, k, conditions, exclude)
        if k > MAX_QUICK_K or len(self._flat) > self.exact_max_vectors or any(
                c.not_eq is not None or c.none_of is not None or c.ranges for c in conditions):
            return None  # $ne, $nin and ranges read every candidate's metadata
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if not self._graph_lock.acquire(blocking=False):
                return None
            try:
                return self._query_locked(query, id, k, conditions, exclude, quick_only=True)
            finally:
                self._graph_lock.release()
        finally:
            self._lock.release()

    def _query_locked(self, query: np.ndarray | None, id: str | None, k: int, conditions: list,
                      exclude: Sequence[str], quick_only: bool = False) -> list[QueryResult] | None:
        """The query under `_lock`; with `quick_only`, None for a filtered query whose plan is not quick."""
        self._check_open()
        if id is not None:
            query = self.vector_of(id)
            exclude = [*exclude, id]
        assert query is not None
        excluded = {self._key_by_id[x] for x in exclude if x in self._key_by_id}
        if conditions:
            allowed = self._metadata_index.matching_keys(conditions, self._key_by_id.values(), self._metadata_of)
            if excluded:
                allowed = allowed - excluded
            num_fetch = self._filter_fetch(len(allowed), k)
            if quick_only and (num_fetch > QUICK_FILTER_FETCH if num_fetch else len(allowed) > QUICK_FILTER_MATCHES):
                return None
            keys, scores = self._search_subset(query, k, allowed, num_fetch)
        else:
            keys, scores = self._search_all(query, k, excluded)
        return [QueryResult(self._id_by_key[key], self._public_score(s), self._metadata_of(key))
                for key, s in zip(keys.tolist(), scores.tolist())]

    def _public_score(self, score: float) -> float:
        return math.sqrt(max(-score, 0.0)) if self.config.metric == "l2" else float(score)

    def _merge(self, parts: list[tuple[np.ndarray, np.ndarray]], k: int,
               excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """Best k of several (keys, scores) lists: one entry per key, live keys only, excluded keys dropped.

        A key can come from both parts while the indexer moves it, and the graph can still return a key deleted
        during that move (its `_id_by_key` slot is None then).
        """
        keys = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        scores = np.concatenate([p[1] for p in parts]).astype(np.float32) if parts else np.empty(0, np.float32)
        order = np.lexsort((keys, -scores))
        out_keys, out_scores, seen = [], [], set()
        for i in order.tolist():
            key = int(keys[i])
            if key in seen or key in excluded or key >= len(self._id_by_key) or self._id_by_key[key] is None:
                continue
            seen.add(key)
            out_keys.append(key)
            out_scores.append(scores[i])
            if len(out_keys) == k:
                break
        return np.array(out_keys, dtype=np.int64), np.array(out_scores, dtype=np.float32)

    def _search_all(self, query: np.ndarray, k: int, excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
        num_fetch = k + len(excluded)
        parts = [self._flat.search(query, num_fetch)]
        if self._graph is not None:
            with self._graph_lock:
                parts.append(self._graph.search(query, num_fetch))
        return self._merge(parts, k, excluded)

    def _filter_fetch(self, num_allowed: int, k: int) -> int:
        """How many neighbours to ask the graph for when `num_allowed` items match a filter; 0: score the matches
        exactly instead (each one's vector read back from the graph, ~3-8 us apiece). Exact while num_allowed^2
        <= FILTER_OVERSAMPLING * k * num_vectors, where reading the matches back costs about what searching the
        graph that deep (~12 us per neighbour past ef) would."""
        if self._graph is None:
            return 0
        num_vectors = len(self._flat) + len(self._graph)
        if num_allowed * num_allowed <= FILTER_OVERSAMPLING * k * num_vectors:
            return 0
        return max(4 * k, math.ceil(FILTER_OVERSAMPLING * k * num_vectors / num_allowed))

    def _search_subset(self, query: np.ndarray, k: int, allowed: set[int],
                       num_fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k of the keys in `allowed` (read only: it can be the metadata index's own posting set).

        num_fetch 0: the matches scored exactly. Else the graph is asked for num_fetch neighbours (~5k of them
        should match), four times as many again while fewer than k did (then exact), and the matching vectors not
        in the graph yet are scored exactly. Approximate: recall@10 0.99+ against exact on the benchmark's
        clustered data with 10% matching (benchmarks/RESULTS.md).
        """
        if not allowed:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if num_fetch and self._graph is not None:
            flat_keys, flat_matrix = self._flat.all()
            is_allowed = np.fromiter((key in allowed for key in flat_keys.tolist()), dtype=bool, count=len(flat_keys))
            flat_part = (flat_keys[is_allowed], _exact_scores(flat_matrix[is_allowed], query, self.config.metric))
            for _ in range(3):
                with self._graph_lock:
                    num_graph = len(self._graph)
                    graph_keys, graph_scores = self._graph.search(query, min(num_fetch, num_graph))
                keep = np.fromiter((key in allowed for key in graph_keys.tolist()), dtype=bool, count=len(graph_keys))
                merged = self._merge([(graph_keys[keep], graph_scores[keep]), flat_part], k, set())
                if len(merged[0]) >= k or num_fetch >= num_graph:
                    return merged
                num_fetch *= 4
        subset = np.fromiter(allowed, dtype=np.int64, count=len(allowed))
        scores = _exact_scores(self._vectors(subset), query, self.config.metric)
        best = top_k(scores, k)
        return subset[best], scores[best]

    # ------------------------------------------------------------------------------------------ the indexer
    def _start_indexer(self) -> None:
        if self._indexer is None or not self._indexer.is_alive():
            self._indexer = threading.Thread(target=self._index_loop, name=f"collection-indexer-{self.name}",
                                             daemon=True)
            self._indexer.start()

    def _index_loop(self) -> None:
        """Move vectors from `flat` into the graph, a chunk at a time, until the collection closes."""
        while True:
            with self._lock:
                while len(self._flat) == 0 and self._wal is not None:
                    self._work.wait()
                if self._wal is None or self._graph is None:
                    return
                keys, vectors = self._flat.first_rows(INDEXER_CHUNK)
                graph = self._graph
            with self._graph_lock:  # queries and upserts go on meanwhile
                is_new = ~graph.contains(keys)  # a snapshot taken mid-move can hold a key in both parts
                graph.add(keys[is_new], vectors[is_new])
            with self._lock:
                gone = []
                for key in keys.tolist():
                    if self._flat.has(key):
                        self._flat.remove(np.array([key], dtype=np.int64))
                    else:
                        gone.append(key)  # deleted or replaced while it was being inserted
                if gone:
                    with self._graph_lock:
                        graph.remove(np.asarray(gone, dtype=np.int64))
                self._work.notify_all()

    def wait_indexed(self, timeout_s: float | None = None) -> bool:
        """Block until every vector is in the graph (or the collection has none); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._graph is not None and len(self._flat) > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._work.wait(remaining)
        return True

    # ------------------------------------------------------------------------------------------ persistence
    def open(self) -> None:
        """Load the newest complete snapshot, replay its log, and get ready to append."""
        with self._lock:
            generations = []
            for path in self.directory.iterdir():
                m = _SNAPSHOT_RE.match(path.name)
                if m and path.is_dir():
                    generations.append(int(m.group(1)))
                elif path.name.endswith(".tmp"):
                    shutil.rmtree(path, ignore_errors=True)  # a compaction that did not finish
            self._generation = max(generations, default=0)
            if generations:
                self._load_snapshot(self.directory / f"snapshot-{self._generation}")
            wal = WriteAheadLog(self.directory / f"wal-{self._generation}.log")
            num_records = 0
            for payload in wal.replay():
                self._apply_record(payload)
                num_records += 1
            wal.open_for_append()
            self._wal = wal
            if self._graph is not None:
                self._start_indexer()
            self._remove_older_generations()
            logger.info("collection %s: %d items (generation %d, %d log records replayed)",
                        self.config.name, len(self), self._generation, num_records)

    def _load_snapshot(self, snapshot: Path) -> None:
        state = json.loads((snapshot / "state.json").read_text())
        self._flat = ExactIndex.load(snapshot, self.config.dimension, self.config.metric)
        if state["has_graph"]:
            self._graph = HnswIndex.load(snapshot, self.config.dimension, self.config.metric)
        with open(snapshot / "items.jsonl") as f:
            for line in f:
                key, item_id, metadata, text = json.loads(line)
                self._remember(key, item_id, metadata, _metadata_json(metadata), text)
        self._next_key = state["next_key"]
        self._snapshot_bytes = sum(p.stat().st_size for p in snapshot.iterdir())

    def _remove_older_generations(self) -> None:
        for path in self.directory.iterdir():
            m = _SNAPSHOT_RE.match(path.name)
            if m and int(m.group(1)) < self._generation:
                shutil.rmtree(path, ignore_errors=True)
            m = re.match(r"^wal-(\d+)\.log$", path.name)
            if m and int(m.group(1)) < self._generation:
                path.unlink(missing_ok=True)

    def _maybe_compact(self) -> None:
        assert self._wal is not None
        if self._wal.num_bytes > max(self.compact_wal_bytes, self._snapshot_bytes):
            self.compact()

    def compact(self) -> None:
        """Write the whole state as snapshot G+1 and start an empty log (see the module docstring)."""
        with self._lock, self._graph_lock:
            self._check_open()
            t0 = time.perf_counter()
            generation = self._generation + 1
            tmp = self.directory / f"snapshot-{generation}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            self._flat.save(tmp)
            if self._graph is not None:
                self._graph.save(tmp)
            with open(tmp / "items.jsonl", "wb") as f:
                for item_id, key in self._key_by_id.items():  # [key, id, metadata, text] per line
                    f.write(b"[%d,%s,%s,%s]\n" % (key, _dumps(item_id), self._metadata_json_by_key[key] or b"null",
                                                  _dumps(self._text_by_key.get(key))))
            _write_json_durably(tmp / "state.json", {"next_key": self._next_key, "count": len(self),
                                                     "has_graph": self._graph is not None})
            for path in tmp.iterdir():
                _fsync_file(path)
            fsync_dir(tmp)
            final = self.directory / f"snapshot-{generation}"
            os.rename(tmp, final)
            fsync_dir(self.directory)
            wal = WriteAheadLog(self.directory / f"wal-{generation}.log")
            wal.open_for_append()
            old = self._wal
            self._wal, self._generation = wal, generation
            if old is not None:
                old.close()
            self._snapshot_bytes = sum(p.stat().st_size for p in final.iterdir())
            self._remove_older_generations()
            logger.info("collection %s: compacted %d items into generation %d in %.2f s", self.config.name,
                        len(self), generation, time.perf_counter() - t0)

    def close(self) -> None:
        """Snapshot what the log holds (a clean restart then loads the graph instead of rebuilding it), stop the
        indexer, close the log."""
        with self._lock:
            if self._wal is not None and self._wal.num_records > 0 and not self._is_deleted:
                self.compact()
            if self._wal is not None:
                self._wal.close()
                self._wal = None
            self._work.notify_all()  # the indexer sees `_wal is None` and exits
        if self._indexer is not None and self._indexer is not threading.current_thread():
            self._indexer.join(timeout=60)


class CollectionStore:
    """Every collection under one root directory; loads them all at construction."""

    def __init__(self, root: Path | str | None = None, *, exact_max_vectors: int = DEFAULT_EXACT_MAX_VECTORS,
                 compact_wal_bytes: int = DEFAULT_COMPACT_WAL_BYTES) -> None:
        limit_blas_threads()
        self.root = Path(root) if root is not None else collections_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self._options = {"exact_max_vectors": exact_max_vectors, "compact_wal_bytes": compact_wal_bytes}
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        for path in sorted(self.root.iterdir()):
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)  # a create or delete that did not finish
                continue
            config_path = path / "collection.json"
            if not config_path.exists():
                continue
            config = CollectionConfig(**json.loads(config_path.read_text()))
            collection = Collection(path, config, **self._options)
            collection.open()
            self._collections[config.name] = collection

    def create(self, name: str, *, dimension: int, metric: str = "cosine", model: str | None = None) -> Collection:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidRequestError("name must be 1-128 characters of letters, digits, '_', '.', '-', starting "
                                      f"with a letter or digit; got {name!r}", "name")
        if metric not in METRICS:
            raise InvalidRequestError(f"metric must be one of {list(METRICS)}, got {metric!r}", "metric")
        if isinstance(dimension, bool) or not isinstance(dimension, int) or not 1 <= dimension <= MAX_DIMENSION:
            raise InvalidRequestError(f"dimension must be an integer from 1 to {MAX_DIMENSION}, got {dimension!r}",
                                      "dimension")
        with self._lock:
            if name in self._collections:
                raise ConflictError(f"a collection named {name!r} already exists", "name")
            config = CollectionConfig(name=name, dimension=dimension, metric=metric, model=model,
                                      created_at=time.time())
            tmp = self.root / f".create-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            _write_json_durably(tmp / "collection.json", asdict(config))
            fsync_dir(tmp)
            os.rename(tmp, self.root / name)
            fsync_dir(self.root)
            collection = Collection(self.root / name, config, **self._options)
            collection.open()
            self._collections[name] = collection
            return collection

    def get(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is None:
            raise NotFoundError(f"no collection named {name!r}", "name")
        return collection

    def list(self) -> list[Collection]:
        return list(self._collections.values())

    def delete(self, name: str) -> None:
        with self._lock:
            collection = self.get(name)
            del self._collections[name]
            collection.close()  # writes after this raise NotFoundError; the indexer thread has stopped
            with collection._lock:
                collection._is_deleted = True
                graveyard = self.root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
                os.rename(collection.directory, graveyard)
                fsync_dir(self.root)
            shutil.rmtree(graveyard, ignore_errors=True)

    def close(self) -> None:
        for collection in self.list():
            collection.close()
