"""Collections over HTTP (issue 10's speed floors), with the in-process Python API as the peer in the same run.

Starts `inferd serve --model all-minilm-l6-v2` on a free port with a temporary collections directory, then:
  1. bulk load N raw 384-d vectors (clustered, seeded) through POST /v1/collections/{name}/items in batches,
     vectors as base64 float32 (what the Python client sends for numpy arrays); vectors/s counts the requests'
     wall time only (bodies are encoded before the clock starts). Then the same for 20k vectors sent as JSON
     numbers, and the time until the background indexer has every vector in the graph
  2. the server's RSS growth per vector (psutil on the server process), and its peak during the load
  3. Q single vector queries at k=10, one at a time: p50/p99 latency and recall@10 against numpy exact search;
     the same with a metadata filter matching ~10% of the items. Two clients: http.client on one keep-alive
     connection (little client work, so the figure is mostly the server's) and httpx (a common Python client)
  4. texts: the same sentences loaded into a text collection vs sent to /v1/embeddings, same batch size
  5. the peer: the server stopped (SIGTERM: it snapshots the collection on the way out), the same directory
     opened in-process (`CollectionStore`: reload time) and the same queries through the Python API

    python benchmarks/collections_http.py                        # 100k vectors, 1000 queries (~5-10 min)
    python benchmarks/collections_http.py --n 20000 --queries 200   # a quick look

1M vectors in two runs (the graph build takes ~10 minutes on 2 cores): the first loads and indexes the collection
into --dir and stops the server (which snapshots it); the second (--reuse) measures a server restarted on that
directory: its RSS against a server on an empty directory (the collection's steady-state memory), then queries.

    python benchmarks/collections_http.py --n 1000000 --dir /tmp/bench-1m --json-load 0 --texts 0 --skip-queries
    python benchmarks/collections_http.py --n 1000000 --dir /tmp/bench-1m --reuse --texts 0
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import signal
import sys
import tempfile
import threading
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


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class PeakSampler:
    """The server's peak RSS and the machine's peak 1-minute load average, sampled every 0.5 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_rss, self.peak_load = pid, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
            except Exception:  # noqa: BLE001 - the server may be gone at the end
                return
            self.peak_load = max(self.peak_load, float(load_average().split()[0]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def load_vectors(http: httpx.Client, args: argparse.Namespace, name: str, base: np.ndarray, group_of: np.ndarray,
                 num_vectors: int, as_base64: bool, rows: Rows | None = None, pid: int | None = None,
                 rss_before: int = 0) -> float:
    """Upsert base[:num_vectors] in batches; the requests' wall time (bodies are encoded before the clock starts).
    With `rows`: also wait for the graph to hold them all and record load rate, index time and memory."""
    sampler = PeakSampler(pid) if pid is not None else None
    t_start = time.perf_counter()
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
    if rows is None:
        return load_s
    while http.get(f"/v1/collections/{name}").json()["unindexed"] > 0:
        time.sleep(0.5)
    indexed_s = time.perf_counter() - t_start
    described = http.get(f"/v1/collections/{name}").json()
    rss_after = rss_bytes(pid)
    sampler.stop()
    rows["bulk load, raw vectors (base64 float32)"] = (
        f"{num_vectors / load_s:,.0f} vectors/s acknowledged ({num_vectors:,} in {load_s:.1f} s of requests, batches "
        f"of {args.batch}); all in the HNSW graph after {indexed_s:.1f} s ({num_vectors / indexed_s:,.0f} vectors/s)")
    growth = rss_after - rss_before
    rows["server RSS growth (after the load, no restart)"] = (
        f"{growth / 2**30:.2f} GiB = {growth / num_vectors:,.0f} B/vector; server RSS {rss_after / 2**30:.2f} GiB, "
        f"peak during the load {sampler.peak_rss / 2**30:.2f} GiB (index reports "
        f"{described['index_bytes'] / num_vectors:,.0f} B/vector, {described['index']}; on disk "
        f"{described['disk_bytes'] / num_vectors:,.0f} B/vector)")
    rows["load average during the load (peak 1-min)"] = f"{sampler.peak_load:.2f}"
    return load_s


def raw_query_fn(port: int):
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def query(raw: bytes) -> list[dict]:
        conn.request("POST", "/v1/collections/bench/query", body=raw, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, data[:500]
        return json.loads(data)["results"]

    return query


def httpx_query_fn(client: httpx.Client):
    def query(raw: bytes) -> list[dict]:
        r = client.post("/v1/collections/bench/query", content=raw, headers={"Content-Type": "application/json"})
        r.raise_for_status()
        return r.json()["results"]

    return query


def http_queries(query, queries: np.ndarray, filter_group: int | None, k: int = K) -> tuple[list[float], np.ndarray]:
    """Latency of each query (the request's round trip, response read; JSON decoding of the answer after the clock)."""
    latencies, found = [], []
    bodies = []
    for q in queries:
        body = {"vector": q.tolist(), "k": k}
        if filter_group is not None:
            body["filter"] = {"group": filter_group}
        bodies.append(json.dumps(body).encode())
    for raw in bodies:
        t = time.perf_counter()
        results = query(raw)
        latencies.append(time.perf_counter() - t)
        found.append([int(x["id"]) for x in results])
    return latencies, np.array(found)


def print_table(args: argparse.Namespace, rows: Rows) -> None:
    print(f"\n{args.n:,} x {args.dim}-d clustered float32 vectors, cosine, {args.queries} queries, one client; "
          f"load average at the end: {load_average()}\n")
    print("| measurement | figure |")
    print("|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500, help="items per upsert request")
    ap.add_argument("--texts", type=int, default=1024, help="sentences for the text-load comparison (0: skip)")
    ap.add_argument("--text-batch", type=int, default=64)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--json-load", type=int, default=20_000, help="vectors loaded as JSON numbers (0: skip)")
    ap.add_argument("--dir", default=None, help="collections directory to use and keep (default: a new temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="--dir already holds collection 'bench' of --n vectors from a run with the same --n/--dim: "
                         "no load; the server restarts on it")
    ap.add_argument("--skip-queries", action="store_true", help="load (and measure memory) only")
    args = ap.parse_args()

    from tests.server_fixtures import start_inferd_server, stop_inferd_server

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine_line()}; "
          f"load average at start: {load_average()}", flush=True)
    t = time.perf_counter()
    base, queries = make_dataset("clustered", args.n, args.queries, args.dim, seed=0)
    group_of = np.arange(args.n) % 10  # metadata {"group": i % 10}: a filter on one group keeps 10%
    if not args.skip_queries:
        truth = exact_top_k(base, queries, K)
        allowed = np.flatnonzero(group_of == 3)
        truth_f = allowed[exact_top_k(base[allowed], queries, K)]
    print(f"# dataset and exact answers: {time.perf_counter() - t:.0f} s", flush=True)
    collections_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="inferd-collections-bench-"))
    collections_dir.mkdir(parents=True, exist_ok=True)
    rows = Rows()
    server_args = ["--max-body-bytes", "64MiB"]
    baseline_rss = None
    if args.reuse:
        # The same server on an empty directory: what the server holds without the collection.
        empty = Path(tempfile.mkdtemp(prefix="inferd-collections-empty-"))
        server = start_inferd_server(server_args, model=args.model, env={"INFERD_COLLECTIONS_DIR": str(empty)})
        time.sleep(2)
        baseline_rss = rss_bytes(server.process.pid)
        stop_inferd_server(server.process)
    t = time.perf_counter()
    server = start_inferd_server(server_args, model=args.model, env={"INFERD_COLLECTIONS_DIR": str(collections_dir)})
    start_s = time.perf_counter() - t
    pid = server.process.pid
    http = httpx.Client(base_url=server.base_url, timeout=600)
    try:
        if args.reuse:
            described = http.get("/v1/collections/bench").json()
            assert described["count"] == args.n, described
            time.sleep(2)
            rss = rss_bytes(pid)
            rows["server restart on the collection"] = (f"{start_s:.1f} s to healthy (model load included), "
                                                        f"{args.n:,} vectors, index {described['index']}")
            rows["server RSS with the collection (after a restart)"] = (
                f"{rss / 2**30:.2f} GiB; {baseline_rss / 2**30:.2f} GiB on an empty directory: the collection "
                f"{(rss - baseline_rss) / 2**30:.2f} GiB = {(rss - baseline_rss) / args.n:,.0f} B/vector "
                f"(index reports {described['index_bytes'] / args.n:,.0f} B/vector; on disk "
                f"{described['disk_bytes'] / args.n:,.0f} B/vector)")
        else:
            rss_before = rss_bytes(pid)
            http.post("/v1/collections", json={"name": "bench", "dimension": args.dim, "metric": "cosine"}).raise_for_status()
            load_vectors(http, args, "bench", base, group_of, args.n, as_base64=True, rows=rows, pid=pid,
                         rss_before=rss_before)
            if args.json_load:
                num_json = min(args.n, args.json_load)
                http.post("/v1/collections", json={"name": "bench-json", "dimension": args.dim}).raise_for_status()
                json_s = load_vectors(http, args, "bench-json", base, group_of, num_json, as_base64=False)
                rows["bulk load, raw vectors (JSON numbers)"] = (f"{num_json / json_s:,.0f} vectors/s ({num_json:,} in "
                                                                 f"{json_s:.1f} s)")
                http.delete("/v1/collections/bench-json").raise_for_status()

        if not args.skip_queries:
            port = int(server.base_url.rsplit(":", 1)[1])
            for client_name in ("http.client", "httpx"):
                query = raw_query_fn(port) if client_name == "http.client" else httpx_query_fn(http)
                http_queries(query, queries, None)  # warm-up pass (page faults, connection)
                lat, found = http_queries(query, queries, None)
                p50, p99 = percentiles_ms(lat)
                rows[f"HTTP vector query, k=10 ({client_name})"] = (f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                                                                     f"recall@10 {recall_at_k(found, truth):.4f}")
                lat, found_f = http_queries(query, queries, 3)
                p50, p99 = percentiles_ms(lat)
                rows[f"HTTP vector query, k=10, filter 10% ({client_name})"] = (
                    f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, recall@10 {recall_at_k(found_f, truth_f):.4f}")
            # The worker-thread hop, A/B: k=100 is answered on the event loop, k=101 (past MAX_QUICK_K) on a worker
            # thread; both search the graph at ef=128 and return ~100 results.
            query = raw_query_fn(port)
            for k in (100, 101, 100, 101):
                lat, _ = http_queries(query, queries, None, k=k)
                p50, p99 = percentiles_ms(lat)
                rows[f"HTTP vector query, k={k} ({'event loop' if k == 100 else 'worker thread'}, http.client)"] = (
                    f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")

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
            http.delete("/v1/collections/bench-text").raise_for_status()
    finally:
        t = time.perf_counter()
        stop_inferd_server(server.process, timeout_s=600)
        print(f"# server stopped (snapshot on the way out) in {time.perf_counter() - t:.1f} s", flush=True)
    if args.skip_queries:
        print_table(args, rows)
        return 0

    # The peer: the same directory reopened in-process (what a restart does), the same queries, no HTTP.
    rss_before = rss_bytes(os.getpid())
    t = time.perf_counter()
    store = CollectionStore(collections_dir)
    reopen_s = time.perf_counter() - t
    rss_growth = rss_bytes(os.getpid()) - rss_before
    rows["reopen in-process (peer)"] = (f"{reopen_s:.1f} s for {args.n:,} vectors; RSS growth "
                                        f"{rss_growth / 2**30:.2f} GiB = {rss_growth / args.n:,.0f} B/vector")
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
    rows["in-process vector query, k=10, filter 10% (peer)"] = (f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                                                                 f"recall@10 {recall_at_k(filtered[1], truth_f):.4f}")
    num_exact = min(len(queries), 100)
    t = time.perf_counter()
    for q in queries[:num_exact]:
        scores = base @ q
        np.argpartition(-scores, K)[:K]
    exact_ms = (time.perf_counter() - t) / num_exact * 1e3
    rows["numpy exact search, one query (peer)"] = f"{exact_ms:.2f} ms mean ({num_exact} queries, one BLAS thread)"
    store.close()
    print_table(args, rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
