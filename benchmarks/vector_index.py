"""Compare vector-index libraries for inferd's collections (issue 10), all measured in one run.

Peers: exact search (numpy matmul, the reference), usearch, faiss-cpu (IndexHNSWFlat), hnswlib, and one embedded
database, sqlite-vec (through apsw: this Python's sqlite3 cannot load extensions). The HNSW libraries share one
graph configuration (M=16, ef_construction=128) and are searched at several ef values.

Each (library, dataset) runs in its own subprocess so its RSS growth is its own. Figures per row: recall@10
against exact search, build time, single-query p50/p99 latency at k=10, RSS growth of the index, incremental
insert and delete cost (per vector, after the build), save + reload time and file size.

    python benchmarks/vector_index.py                      # 100k random + clustered, all libraries (~10 min)
    python benchmarks/vector_index.py --crossover          # exact vs usearch latency at 1k..100k vectors
    python benchmarks/vector_index.py --n 1000000 --libs usearch --datasets clustered

Vectors are 384-d float32, L2-normalised (cosine == inner product). "random": i.i.d. Gaussian directions (the hard
case for graph indexes: no structure). "clustered": 1,000 Gaussian clusters, like embeddings of topics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 10
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 128
EF_SEARCH_VALUES = (32, 64, 128)
NUM_BUILD_THREADS = 2


def limit_blas_threads() -> None:
    """Exact search as inferd runs it: numpy with one BLAS thread (inferd/collections/index.py says why)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def make_dataset(kind: str, num_vectors: int, num_queries: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (base [num_vectors, dim], queries [num_queries, dim]), float32, unit rows."""
    rng = np.random.default_rng(seed)
    total = num_vectors + num_queries
    if kind == "random":
        x = rng.standard_normal((total, dim), dtype=np.float32)
    elif kind == "clustered":
        num_clusters = 1000
        centers = rng.standard_normal((num_clusters, dim), dtype=np.float32)
        labels = rng.integers(0, num_clusters, size=total)
        # Noise norm ~0.6x the centre norm: clusters overlap enough that the top 10 is not one cluster's trivia.
        x = centers[labels] + 0.6 * rng.standard_normal((total, dim), dtype=np.float32)
    else:
        raise ValueError(f"unknown dataset {kind!r}; known: random, clustered")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x[:num_vectors]), np.ascontiguousarray(x[num_vectors:])


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[num_queries, k] row ids of the k largest inner products, best first, in chunks of 256 queries."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start:start + 256] @ base.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out[start:start + 256] = np.take_along_axis(part, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- library adapters
# Each adapter: build(base), search(query [dim], k, ef) -> ids, add(ids, vectors), remove(ids) (None when the
# library cannot), save(path), load(path).


class NumpyExact:
    name = "numpy-exact"
    ef_values = (None,)

    def build(self, base):
        self.x = base.copy()
        self.ids = np.arange(len(base))

    def search(self, q, k, ef):
        scores = self.x @ q
        part = np.argpartition(-scores, k)[:k]
        return self.ids[part[np.argsort(-scores[part])]]

    def add(self, ids, vectors):
        self.x = np.concatenate([self.x, vectors])
        self.ids = np.concatenate([self.ids, ids])

    def remove(self, ids):
        keep = ~np.isin(self.ids, ids)
        self.x, self.ids = self.x[keep], self.ids[keep]

    def save(self, path):
        np.save(path / "x.npy", self.x)
        np.save(path / "ids.npy", self.ids)

    def load(self, path):
        self.x = np.load(path / "x.npy")
        self.ids = np.load(path / "ids.npy")


class USearch:
    name = "usearch"
    ef_values = EF_SEARCH_VALUES

    def __init__(self, dtype="f32"):
        self.dtype = dtype
        if dtype != "f32":
            self.name = f"usearch-{dtype}"

    def _new(self, dim):
        from usearch.index import Index

        return Index(ndim=dim, metric="ip", dtype=self.dtype, connectivity=HNSW_M, expansion_add=HNSW_EF_CONSTRUCTION)

    def build(self, base):
        self.index = self._new(base.shape[1])
        self.index.add(np.arange(len(base)), base, threads=NUM_BUILD_THREADS)

    def search(self, q, k, ef):
        self.index.expansion_search = ef
        return self.index.search(q, k).keys

    def add(self, ids, vectors):
        self.index.add(ids, vectors, threads=1)

    def remove(self, ids):
        self.index.remove(ids)

    def save(self, path):
        self.index.save(str(path / "index.usearch"))

    def load(self, path):
        from usearch.index import Index

        self.index = Index.restore(str(path / "index.usearch"))


class Faiss:
    name = "faiss-hnsw"
    ef_values = EF_SEARCH_VALUES

    def build(self, base):
        import faiss

        faiss.omp_set_num_threads(NUM_BUILD_THREADS)
        self.index = faiss.IndexHNSWFlat(base.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.index.add(base)
        faiss.omp_set_num_threads(1)

    def search(self, q, k, ef):
        self.index.hnsw.efSearch = ef
        return self.index.search(q[None, :], k)[1][0]

    def add(self, ids, vectors):
        self.index.add(vectors)  # ids are implicit (sequential): HNSWFlat has no add_with_ids

    remove = None  # IndexHNSWFlat.remove_ids raises: HNSW in faiss does not support deletion

    def save(self, path):
        import faiss

        faiss.write_index(self.index, str(path / "index.faiss"))

    def load(self, path):
        import faiss

        self.index = faiss.read_index(str(path / "index.faiss"))


class Hnswlib:
    name = "hnswlib"
    ef_values = EF_SEARCH_VALUES

    def build(self, base):
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=base.shape[1])
        self.index.init_index(max_elements=len(base) + 10_000, M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION,
                              allow_replace_deleted=True)
        self.index.set_num_threads(NUM_BUILD_THREADS)
        self.index.add_items(base, np.arange(len(base)))
        self.index.set_num_threads(1)

    def search(self, q, k, ef):
        self.index.set_ef(ef)
        return self.index.knn_query(q, k)[0][0]

    def add(self, ids, vectors):
        self.index.add_items(vectors, ids)

    def remove(self, ids):
        for i in ids:
            self.index.mark_deleted(int(i))

    def save(self, path):
        self.index.save_index(str(path / "index.hnsw"))

    def load(self, path):
        import hnswlib

        dim = self.index.dim
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.load_index(str(path / "index.hnsw"), allow_replace_deleted=True)


class SqliteVec:
    """sqlite-vec's vec0 table: a durable SQL table with brute-force KNN (no ANN index in 0.1.x)."""

    name = "sqlite-vec"
    ef_values = (None,)
    max_queries = 100  # each query scans the table: keep the run to minutes

    def _connect(self, path):
        import apsw
        import sqlite_vec

        db = apsw.Connection(str(path))
        db.enable_load_extension(True)
        db.load_extension(sqlite_vec.loadable_path())
        return db

    def build(self, base):
        self.dir = Path(tempfile.mkdtemp(prefix="vi-sqlite-"))
        self.db = self._connect(self.dir / "db.sqlite")
        self.db.execute(f"create virtual table v using vec0(embedding float[{base.shape[1]}] distance_metric=cosine)")
        self.add(np.arange(len(base)), base)

    def search(self, q, k, ef):
        rows = self.db.execute("select rowid from v where embedding match ? and k = ? order by distance",
                               (q.astype(np.float32).tobytes(), k))
        return np.array([r[0] for r in rows])

    def add(self, ids, vectors):
        with self.db:
            self.db.executemany("insert into v(rowid, embedding) values (?, ?)",
                                ((int(i), v.tobytes()) for i, v in zip(ids, vectors)))

    def remove(self, ids):
        with self.db:
            self.db.executemany("delete from v where rowid = ?", ((int(i),) for i in ids))

    def save(self, path):
        self.db.close()  # every committed transaction is already on disk
        import shutil

        shutil.copy(self.dir / "db.sqlite", path / "db.sqlite")

    def load(self, path):
        self.db = self._connect(path / "db.sqlite")


LIBRARIES = {
    "numpy": NumpyExact,
    "usearch": USearch,
    "usearch-f16": lambda: USearch("f16"),
    "faiss": Faiss,
    "hnswlib": Hnswlib,
    "sqlite-vec": SqliteVec,
}


def data_paths(cache_dir: Path, dataset: str, n: int, dim: int, num_queries: int) -> dict[str, Path]:
    stem = f"{dataset}-{n}-{dim}-{num_queries}"
    return {name: cache_dir / f"{stem}.{name}.npy" for name in ("base", "queries", "truth")}


def prepare(cache_dir: Path, dataset: str, n: int, dim: int, num_queries: int) -> dict[str, Path]:
    paths = data_paths(cache_dir, dataset, n, dim, num_queries)
    if not all(p.exists() for p in paths.values()):
        base, queries = make_dataset(dataset, n, num_queries, dim, seed=0)
        np.save(paths["base"], base)
        np.save(paths["queries"], queries)
        np.save(paths["truth"], exact_top_k(base, queries, K))
    return paths


def run_child(lib_name: str, paths: dict[str, str], num_queries: int) -> dict:
    """One library on one dataset; prints one JSON line."""
    base = np.load(paths["base"])
    queries = np.load(paths["queries"])
    truth = np.load(paths["truth"])
    lib = LIBRARIES[lib_name]()
    num_queries = min(num_queries, getattr(lib, "max_queries", num_queries), len(queries))
    queries, truth = queries[:num_queries], truth[:num_queries]
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    lib.build(base)
    build_s = time.perf_counter() - t0
    index_rss = rss_bytes() - rss_before
    row = {"lib": lib.name, "n": len(base), "build_s": build_s, "rss_mib": index_rss / 2**20,
           "bytes_per_vector": index_rss / len(base), "searches": []}
    for ef in lib.ef_values:
        lib.search(queries[0], K, ef)  # warm-up
        found, lat_s = [], []
        for q in queries:
            t = time.perf_counter()
            found.append(np.asarray(lib.search(q, K, ef)))
            lat_s.append(time.perf_counter() - t)
        lat_ms = np.array(lat_s) * 1e3
        row["searches"].append({"ef": ef, "recall": recall_at_k(np.stack(found), truth),
                                "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))})
    # Incremental: 1,000 new vectors one call each (how an upsert stream meets the index), then delete them.
    rng = np.random.default_rng(1)
    extra = rng.standard_normal((1000, base.shape[1]), dtype=np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    extra_ids = np.arange(len(base), len(base) + len(extra))
    t = time.perf_counter()
    for i in range(0, len(extra), 10):  # batches of 10, like small upsert requests
        lib.add(extra_ids[i:i + 10], extra[i:i + 10])
    row["insert_us_per_vector"] = (time.perf_counter() - t) / len(extra) * 1e6
    if lib.remove is None:
        row["delete_us_per_vector"] = None
    else:
        t = time.perf_counter()
        for i in range(0, len(extra), 10):
            lib.remove(extra_ids[i:i + 10])
        row["delete_us_per_vector"] = (time.perf_counter() - t) / len(extra) * 1e6
    with tempfile.TemporaryDirectory(prefix="vi-save-") as d:
        t = time.perf_counter()
        lib.save(Path(d))
        row["save_s"] = time.perf_counter() - t
        row["file_mib"] = dir_bytes(Path(d)) / 2**20
        t = time.perf_counter()
        lib.load(Path(d))
        row["load_s"] = time.perf_counter() - t
        ef = lib.ef_values[-1]
        after = np.stack([np.asarray(lib.search(q, K, ef)) for q in queries[:100]])
        row["recall_after_reload"] = recall_at_k(after, truth[:100])
    return row


def crossover(cache_dir: Path, dim: int, sizes: list[int]) -> list[dict]:
    """Single-query latency of exact numpy search vs inferd's graph (usearch, float16, its M/ef settings) by size."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from inferd.collections.index import HnswIndex

    rows = []
    base_all, queries = make_dataset("clustered", max(sizes), 200, dim, seed=0)
    for n in sizes:
        base = base_all[:n]
        truth = exact_top_k(base, queries, K)
        exact = NumpyExact()
        exact.build(base)
        index = HnswIndex(dim, "cosine")
        t = time.perf_counter()
        index.add(np.arange(n), base, num_threads=NUM_BUILD_THREADS)
        build_s = time.perf_counter() - t
        row = {"n": n, "usearch_build_s": build_s}
        for name, fn in (("exact", lambda q: exact.search(q, K, None)), ("usearch", lambda q: index.search(q, K)[0])):
            fn(queries[0])
            lat, found = [], []
            for q in queries:
                t = time.perf_counter()
                found.append(np.asarray(fn(q)))
                lat.append(time.perf_counter() - t)
            row[f"{name}_p50_ms"] = float(np.percentile(np.array(lat) * 1e3, 50))
            row[f"{name}_recall"] = recall_at_k(np.stack(found), truth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def machine_line() -> str:
    flags, model = "", platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = " ".join(sorted(x for x in line.split() if x.startswith("avx512") or x in ("avx2", "fma",
                                                                                                     "f16c")))
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, flags: {flags}"


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--datasets", default="random,clustered")
    ap.add_argument("--libs", default="numpy,usearch,usearch-f16,faiss,hnswlib,sqlite-vec")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "inferd-vector-bench"))
    ap.add_argument("--crossover", action="store_true", help="exact vs usearch latency at growing sizes")
    ap.add_argument("--crossover-sizes", default="1000,2000,5000,10000,20000,50000")
    ap.add_argument("--child", nargs=2, metavar=("LIB", "DATASET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    limit_blas_threads()
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        paths = data_paths(cache_dir, args.child[1], args.n, args.dim, args.queries)
        print(json.dumps(run_child(args.child[0], {k: str(v) for k, v in paths.items()}, args.queries)))
        return 0
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine_line()}")
    if args.crossover:
        rows = crossover(cache_dir, args.dim, [int(s) for s in args.crossover_sizes.split(",")])
        print("\n| vectors | exact p50 ms | inferd graph p50 ms (usearch f16, ef=128) | graph recall@10 | graph build s |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['n']:,} | {r['exact_p50_ms']:.3f} | {r['usearch_p50_ms']:.3f} | {r['usearch_recall']:.3f} "
                  f"| {r['usearch_build_s']:.2f} |")
        return 0
    results = []
    for dataset in args.datasets.split(","):
        prepare(cache_dir, dataset, args.n, args.dim, args.queries)
        for lib in args.libs.split(","):
            cmd = [sys.executable, __file__, "--child", lib, dataset, "--n", str(args.n), "--dim", str(args.dim),
                   "--queries", str(args.queries), "--cache-dir", str(cache_dir)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{lib} on {dataset} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["dataset"] = dataset
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.n:,} x {args.dim}-d float32, k={K}, {args.queries} single queries "
          f"(sqlite-vec: {SqliteVec.max_queries}); HNSW M={HNSW_M}, ef_construction={HNSW_EF_CONSTRUCTION}, "
          f"build threads={NUM_BUILD_THREADS}, query threads=1\n")
    print("| dataset | library | ef | recall@10 | p50 ms | p99 ms | build s | index RSS MiB | B/vector "
          "| insert us/vec | delete us/vec | save s | load s | file MiB | recall after reload |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for s in r["searches"]:
            print(f"| {r['dataset']} | {r['lib']} | {s['ef'] or '-'} | {s['recall']:.4f} | {s['p50_ms']:.3f} "
                  f"| {s['p99_ms']:.3f} | {r['build_s']:.1f} | {r['rss_mib']:.0f} | {r['bytes_per_vector']:.0f} "
                  f"| {fmt(r['insert_us_per_vector'], '.0f')} | {fmt(r['delete_us_per_vector'], '.1f')} "
                  f"| {r['save_s']:.2f} | {r['load_s']:.2f} | {r['file_mib']:.0f} | {r['recall_after_reload']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
