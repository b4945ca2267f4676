"""Vector indexes keyed by integer keys: exact search (numpy) and HNSW (usearch, the only usearch importer).

Both score with an inner product over the vectors they are given (the collection normalises rows for cosine)
or a negative squared L2 distance, so "larger score is better" holds for every metric here:

    metric   stored vector      score(q, x)
    cosine   x / |x|            q . x           (q normalised too)
    dot      x                  q . x
    l2       x                  -|q - x|^2      (the collection reports sqrt(-score), smallest first)

`ExactIndex` keeps rows in one float32 matrix [capacity, dim] (deletes move the last row into the hole, so the
live rows stay contiguous). `HnswIndex` is usearch's HNSW graph storing vectors as float16 (half the memory of
float32: ~1,170 B/vector for 384-d graphs at 100k, benchmarks/RESULTS.md; a relative error of at most 2^-11 per component, well below what
moves a recall@10); `get` / `exact_scores` over a key subset read those float16 vectors back as float32.
usearch was chosen by `benchmarks/vector_index.py` (see ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("cosine", "dot", "l2")
# HNSW graph settings (M, ef_construction, ef_search): recall@10 >= 0.99 on clustered 384-d data at 100k
# vectors and 0.95+ on unstructured random data (benchmarks/vector_index.py).
HNSW_CONNECTIVITY = 16
HNSW_EXPANSION_ADD = 128
HNSW_EXPANSION_SEARCH = 128
HNSW_DTYPE = "f16"


def limit_blas_threads() -> None:
    """One BLAS thread for numpy in this process: an exact scan is a memory-bound matrix-vector product, and on
    2 busy cores OpenBLAS's spinning worker threads made a 2,000 x 384 scan take 30-45 ms instead of 0.2-0.5 ms
    single-threaded (measured on the project machine). torch keeps its own thread pool."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="blas")


def require_usearch():
    """usearch's Index class, or an ImportError that says how to install it."""
    try:
        from usearch.index import Index
    except ImportError as exc:
        raise ImportError("collections past the exact-search size need the usearch HNSW index: "
                          "pip install 'inferd[collections]'") from exc
    return Index


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores [n], best first (ties broken by position)."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def _scores(matrix: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """[n] scores of query [dim] against matrix [n, dim]."""
    if metric == "l2":
        diff = matrix - query
        return -np.einsum("ij,ij->i", diff, diff)
    return matrix @ query


class ExactIndex:
    kind = "exact"

    def __init__(self, dim: int, metric: str) -> None:
        self.dim = dim
        self.metric = metric
        self._matrix = np.empty((0, dim), dtype=np.float32)
        self._keys = np.empty(0, dtype=np.int64)  # [capacity] key of each row
        self._row_by_key: dict[int, int] = {}
        self._num_rows = 0

    def __len__(self) -> int:
        return self._num_rows

    @property
    def num_bytes(self) -> int:
        return self._matrix.nbytes + self._keys.nbytes

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """keys [n] int64 not already present, vectors [n, dim] float32."""
        n = len(keys)
        needed = self._num_rows + n
        if needed > len(self._matrix):
            capacity = max(needed, 2 * len(self._matrix), 1024)
            matrix = np.empty((capacity, self.dim), dtype=np.float32)
            matrix[: self._num_rows] = self._matrix[: self._num_rows]
            keys_grown = np.empty(capacity, dtype=np.int64)
            keys_grown[: self._num_rows] = self._keys[: self._num_rows]
            self._matrix, self._keys = matrix, keys_grown
        rows = slice(self._num_rows, needed)
        self._matrix[rows] = vectors
        self._keys[rows] = keys
        for i, key in enumerate(keys.tolist()):
            self._row_by_key[key] = self._num_rows + i
        self._num_rows = needed

    def remove(self, keys: np.ndarray) -> None:
        for key in keys.tolist():
            row = self._row_by_key.pop(key)
            last = self._num_rows - 1
            if row != last:
                moved_key = int(self._keys[last])
                self._matrix[row] = self._matrix[last]
                self._keys[row] = moved_key
                self._row_by_key[moved_key] = row
            self._num_rows = last
        # Give memory back once a drained buffer (the collection's not-yet-indexed vectors) is mostly empty.
        if len(self._matrix) > 4096 and self._num_rows < len(self._matrix) // 4:
            capacity = max(2 * self._num_rows, 1024)
            self._matrix = self._matrix[:capacity].copy()
            self._keys = self._keys[:capacity].copy()

    def has(self, key: int) -> bool:
        return key in self._row_by_key

    def get(self, keys: np.ndarray) -> np.ndarray:
        rows = [self._row_by_key[k] for k in keys.tolist()]
        return self._matrix[rows]

    def first_rows(self, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (keys [m], vectors [m, dim]) of up to num_rows live rows."""
        m = min(num_rows, self._num_rows)
        return self._keys[:m].copy(), self._matrix[:m].copy()

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys [n], vectors [n, dim]) views of every live row."""
        return self._keys[: self._num_rows], self._matrix[: self._num_rows]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys [<=k], scores [<=k]) best first."""
        if self._num_rows == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        keys, matrix = self.all()
        scores = _scores(matrix, query, self.metric)
        best = top_k(scores, k)
        return keys[best], scores[best]

    def exact_scores(self, keys: np.ndarray, query: np.ndarray) -> np.ndarray:
        return _scores(self.get(keys), query, self.metric)

    def save(self, directory: Path) -> None:
        keys, matrix = self.all()
        np.save(directory / "keys.npy", keys)
        np.save(directory / "vectors.npy", matrix)

    @classmethod
    def load(cls, directory: Path, dim: int, metric: str) -> ExactIndex:
        index = cls(dim, metric)
        index.add(np.load(directory / "keys.npy"), np.load(directory / "vectors.npy"))
        return index


class HnswIndex:
    kind = "hnsw"

    def __init__(self, dim: int, metric: str) -> None:
        Index = require_usearch()

        self.dim = dim
        self.metric = metric
        self._index = Index(
            ndim=dim,
            metric="l2sq" if metric == "l2" else "ip",
            dtype=HNSW_DTYPE,
            connectivity=HNSW_CONNECTIVITY,
            expansion_add=HNSW_EXPANSION_ADD,
            expansion_search=HNSW_EXPANSION_SEARCH,
        )

    def __len__(self) -> int:
        return len(self._index)

    @property
    def num_bytes(self) -> int:
        return int(self._index.memory_usage)

    def _score(self, distances: np.ndarray) -> np.ndarray:
        # usearch distances: "ip" is 1 - q.x, "l2sq" is |q - x|^2.
        return -distances if self.metric == "l2" else 1.0 - distances

    def add(self, keys: np.ndarray, vectors: np.ndarray, *, num_threads: int = 0) -> None:
        # usearch rejects read-only buffers (np.frombuffer over a log record): hand it a writable copy then.
        vectors = vectors if vectors.flags.writeable else vectors.copy()
        self._index.add(keys.astype(np.uint64), np.ascontiguousarray(vectors, dtype=np.float32), threads=num_threads)

    def remove(self, keys: np.ndarray) -> None:
        self._index.remove(keys.astype(np.uint64))

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """[n] bool."""
        if len(keys) == 0:
            return np.zeros(0, dtype=bool)
        return np.asarray(self._index.contains(keys.astype(np.uint64)), dtype=bool).reshape(len(keys))

    def get(self, keys: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray(self._index.get(keys.astype(np.uint64), dtype=np.float32), dtype=np.float32)

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(self._index.keys, dtype=np.int64)
        return keys, self.get(keys)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._index) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        matches = self._index.search(query, k)
        return np.asarray(matches.keys, dtype=np.int64), self._score(np.asarray(matches.distances, np.float32))

    def exact_scores(self, keys: np.ndarray, query: np.ndarray) -> np.ndarray:
        return _scores(self.get(keys), query, self.metric)

    def save(self, directory: Path) -> None:
        self._index.save(str(directory / "index.usearch"))

    @classmethod
    def load(cls, directory: Path, dim: int, metric: str) -> HnswIndex:
        index = cls(dim, metric)
        index._index.load(str(directory / "index.usearch"))
        index._index.expansion_search = HNSW_EXPANSION_SEARCH
        return index

