"""Collections over HTTP (issue 10's speed floors), with the in-process Python API as the peer in the same run.

Starts `inferd serve --model all-minilm-l6-v2` on a free port with a temporary collections directory, then:
  1. bulk load N raw 384-d vectors (clustered, seeded) through POST /v1/collections/{name}/items in batches,
     vectors as base64 float32 (what the Python client sends for numpy arrays); vectors/s counts the requests'
     wall time only (bodies are encoded before the clock starts). Then the same for 20k vectors sent as JSON
     numbers, and the time until the background indexer has every vector in the graph
  2. the server's RSS growth per vector (psutil on the server process)
  3. Q single vector queries at k=10, one at a time: p50/p99 latency and recall@10 against numpy exact search;
     the same with a metadata filter matching ~10% of the items
  4. texts: the same sentences loaded into a text collection vs sent to /v1/embeddings, same batch size
  5. the peer: the server stopped (SIGTERM: it snapshots the collection on the way out), the same directory
     opened in-process (`CollectionStore`: reload time) and the same queries through the Python API

    python benchmarks/collections_http.py                        # 100k vectors, 1000 queries (~5-10 min)
    python benchmarks/collections_http.py --n 20000 --queries 200   # a quick look
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from vector_index import exact_top_k, machine_line, make_dataset, recall_at_k  # noqa: E402

from inferd.collections import CollectionStore  # noqa: E402

K = 10
WORDS = ("river mountain city market price stock bond cat dog bird music jazz guitar piano court law judge "
         "election vote senate doctor patient cancer drug trial school student exam teacher rain storm wind "
         "summer winter farm wheat corn harvest engine car train plane ship ocean fish whale star planet moon "
         "galaxy code bug server network cloud data model learning").split()


class Rows(dict):
    """Figures by name, each also printed as soon as it is measured (a long run that dies keeps what it had)."""

    def __setitem__(self, name: str, value: str) -> None:
        print(f"{name}: {value}", flush=True)
        super().__setitem__(name, value)


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500, help="items per upsert request")
    ap.add_argument("--texts", type=int, default=1024, help="sentences for the text-load comparison (0: skip)")
    ap.add_argument("--text-batch", type=int, default=64)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    args = ap.parse_args()

    from tests.server_fixtures import start_inferd_server, stop_inferd_server

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine_line()}")
    base, queries = make_dataset("clustered", args.n, args.queries, args.dim, seed=0)
    truth = exact_top_k(base, queries, K)
    group_of = np.arange(args.n) % 10  # metadata {"group": i % 10}: a filter on one group keeps 10%
    collections_dir = Path(tempfile.mkdtemp(prefix="inferd-collections-bench-"))
    server = start_inferd_server(["--max-body-bytes", "64MiB"], model=args.model,
                                 env={"INFERD_COLLECTIONS_DIR": str(collections_dir)})
    pid = server.process.pid
    http = httpx.Client(base_url=server.base_url, timeout=600)
    rows = Rows()
    try:
        rss_before = rss_bytes(pid)
        http.post("/v1/collections", json={"name": "bench", "dimension": args.dim, "metric": "cosine"}).raise_for_status()

        def load(name: str, num_vectors: int, as_base64: bool) -> float:
            load_s = 0.0
            for start in range(0, num_vectors, args.batch):
                stop = min(start + args.batch, num_vectors)
                body = json.dumps({"items": [
                    {"id": str(i), "metadata": {"group": int(group_of[i])},
                     "vector": base64.b64encode(base[i].astype("<f4").tobytes()).decode() if as_base64 else base[i].tolist()}
                    for i in range(start, stop)]})
                t = time.perf_counter()
                r = http.post(f"/v1/collections/{name}/items", content=body, headers={"Content-Type": "application/json"})
                load_s += time.perf_counter() - t
                r.raise_for_status()
            return load_s

        t_start = time.perf_counter()
        load_s = load("bench", args.n, as_base64=True)
        while http.get("/v1/collections/bench").json()["unindexed"] > 0:
            time.sleep(0.5)
        indexed_s = time.perf_counter() - t_start
        described = http.get("/v1/collections/bench").json()
        rss_growth = rss_bytes(pid) - rss_before
        rows["bulk load, raw vectors (base64 float32)"] = (
            f"{args.n / load_s:,.0f} vectors/s acknowledged ({args.n:,} in {load_s:.1f} s, batches of {args.batch}); "
            f"all in the HNSW graph after {indexed_s:.1f} s ({args.n / indexed_s:,.0f} vectors/s)")
        num_json = min(args.n, 20_000)
        http.post("/v1/collections", json={"name": "bench-json", "dimension": args.dim}).raise_for_status()
        json_s = load("bench-json", num_json, as_base64=False)
        rows["bulk load, raw vectors (JSON numbers)"] = f"{num_json / json_s:,.0f} vectors/s ({num_json:,} in {json_s:.1f} s)"
        http.delete("/v1/collections/bench-json").raise_for_status()
        rows["server RSS growth"] = (f"{rss_growth / 2**20:,.0f} MiB = {rss_growth / args.n:,.0f} B/vector "
                                     f"(index reports {described['index_bytes'] / args.n:,.0f} B/vector, "
                                     f"{described['index']}; on disk {described['disk_bytes'] / args.n:,.0f} B/vector)")

        def http_queries(filter_group: int | None) -> tuple[list[float], np.ndarray]:
            latencies, found = [], []
            for q in queries:
                body = {"vector": q.tolist(), "k": K}
                if filter_group is not None:
                    body["filter"] = {"group": filter_group}
                raw = json.dumps(body)
                t = time.perf_counter()
                r = http.post("/v1/collections/bench/query", content=raw, headers={"Content-Type": "application/json"})
                latencies.append(time.perf_counter() - t)
                found.append([int(x["id"]) for x in r.json()["results"]])
            return latencies, np.array(found)

        http_queries(None)  # warm-up pass (page faults, connection)
        lat, found = http_queries(None)
        p50, p99 = percentiles_ms(lat)
        rows["HTTP vector query, k=10"] = f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, recall@10 {recall_at_k(found, truth):.4f}"
        lat, found_f = http_queries(3)
        allowed = np.flatnonzero(group_of == 3)
        truth_f = allowed[exact_top_k(base[allowed], queries, K)]
        p50, p99 = percentiles_ms(lat)
        rows["HTTP vector query, k=10, filter 10%"] = (f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                                                       f"recall@10 {recall_at_k(found_f, truth_f):.4f}")

        if args.texts:
            rng = random.Random(0)
            texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) for _ in range(args.texts)]
            http.post("/v1/collections", json={"name": "bench-text", "model": args.model}).raise_for_status()
            for attempt in ("embeddings", "collection"):
                t = time.perf_counter()
                for start in range(0, len(texts), args.text_batch):
                    chunk = texts[start:start + args.text_batch]
                    if attempt == "embeddings":
                        r = http.post("/v1/embeddings", json={"model": args.model, "input": chunk})
                    else:
                        r = http.post("/v1/collections/bench-text/items",
                                      json={"items": [{"id": f"t{start + j}", "text": s} for j, s in enumerate(chunk)]})
                    r.raise_for_status()
                elapsed = time.perf_counter() - t
                rows[f"texts via {'/v1/embeddings' if attempt == 'embeddings' else 'collection upsert'}"] = (
                    f"{len(texts) / elapsed:,.0f} texts/s ({len(texts)} sentences of 12-40 words, batches of "
                    f"{args.text_batch})")
    finally:
        stop_inferd_server(server.process)

    # The peer: the same directory reopened in-process (what a restart does), the same queries, no HTTP.
    t = time.perf_counter()
    store = CollectionStore(collections_dir)
    rows["reopen (restart) time"] = f"{time.perf_counter() - t:.1f} s for {args.n:,} vectors"
    collection = store.get("bench")
    collection.wait_indexed()
    measured = {}
    for filter_group in (None, None, 3):  # the first pass warms up
        lat, found = [], []
        for q in queries:
            t = time.perf_counter()
            res = collection.query(q, k=K, filter=None if filter_group is None else {"group": filter_group})
            lat.append(time.perf_counter() - t)
            found.append([int(r.id) for r in res])
        measured[filter_group] = (lat, np.array(found))
    unfiltered, filtered = measured[None], measured[3]
    p50, p99 = percentiles_ms(unfiltered[0])
    rows["in-process vector query, k=10 (peer)"] = (f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                                                     f"recall@10 {recall_at_k(unfiltered[1], truth):.4f}")
    p50, p99 = percentiles_ms(filtered[0])
    rows["in-process vector query, k=10, filter 10% (peer)"] = f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    t = time.perf_counter()
    for q in queries:
        scores = base @ q
        np.argpartition(-scores, K)[:K]
    exact_ms = (time.perf_counter() - t) / len(queries) * 1e3
    rows["numpy exact search, one query (peer)"] = f"{exact_ms:.2f} ms mean"
    store.close()

    print(f"\n{args.n:,} x {args.dim}-d clustered float32 vectors, cosine, {args.queries} queries, one client\n")
    print("| measurement | figure |")
    print("|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
