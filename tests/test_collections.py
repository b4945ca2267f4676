"""Collections (inferd/collections): exact answers vs numpy, filters vs a brute-force reference, durability.

References: numpy exact search written out here (matmul / squared distances, sorted), and a plain-Python filter
evaluator over the metadata; the WAL is damaged by hand (truncated, bit-flipped) and a real writer subprocess is
killed with SIGKILL.
"""

from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from inferd.collections import CollectionStore, ConflictError, InvalidRequestError, Item, NotFoundError
from inferd.collections.wal import CorruptLogError, WriteAheadLog

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def reference_search(vectors: np.ndarray, ids: list[str], query: np.ndarray, metric: str, k: int,
                     allowed: set[str] | None = None) -> list[tuple[str, float]]:
    """Best-first (id, public score) by brute force in float64."""
    x = vectors.astype(np.float64)
    q = query.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q)
    if metric == "l2":
        scores = -((x - q) ** 2).sum(axis=1)
    else:
        scores = x @ q
    order = sorted(range(len(ids)), key=lambda i: -scores[i])
    out = [(ids[i], math.sqrt(-scores[i]) if metric == "l2" else scores[i]) for i in order
           if allowed is None or ids[i] in allowed]
    return out[:k]


def make_items(rng: np.random.Generator, n: int, dim: int = DIM, prefix: str = "item") -> list[Item]:
    genres = ["jazz", "rock", "folk", "pop"]
    items = []
    for i in range(n):
        metadata = {"genre": genres[i % 4], "year": 1960 + (i * 7) % 60, "tags": [f"t{i % 3}", f"t{i % 5}"]}
        if i % 11 == 0:
            metadata = {}  # items without metadata
        items.append(Item(id=f"{prefix}{i}", vector=rng.standard_normal(dim).astype(np.float32), metadata=metadata))
    return items


def matches(metadata: dict, flt: dict) -> bool:
    """Plain-Python reading of the filter language (filters.py docstring), for comparison."""
    for name, cond in flt.items():
        present = name in metadata
        raw = metadata.get(name)
        values = raw if isinstance(raw, list) else ([raw] if present else [])
        ops = cond if isinstance(cond, dict) else {"$eq": cond}
        for op, want in ops.items():
            def eq(a, b):
                return type(a) is type(b) and a == b or (
                    isinstance(a, (int, float)) and isinstance(b, (int, float))
                    and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
            if op == "$eq" and not any(eq(v, want) for v in values):
                return False
            if op == "$ne" and any(eq(v, want) for v in values):
                return False
            if op == "$in" and not any(eq(v, w) for v in values for w in want):
                return False
            if op == "$nin" and any(eq(v, w) for v in values for w in want):
                return False
            if op in ("$gt", "$gte", "$lt", "$lte"):
                nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                fn = {"$gt": lambda a: a > want, "$gte": lambda a: a >= want, "$lt": lambda a: a < want,
                      "$lte": lambda a: a <= want}[op]
                if not any(fn(v) for v in nums):
                    return False
    return True


def assert_same_results(got, expected, *, rel=1e-4):
    assert [r.id for r in got] == [e[0] for e in expected]
    for r, (_, score) in zip(got, expected):
        assert r.score == pytest.approx(score, rel=rel, abs=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_exact_search_matches_numpy(tmp_path, metric):
    rng = np.random.default_rng(0)
    store = CollectionStore(tmp_path)
    col = store.create("c", dimension=DIM, metric=metric)
    items = make_items(rng, 300)
    col.upsert(items[:150])
    col.upsert(items[150:])
    vectors = np.stack([it.vector for it in items])
    ids = [it.id for it in items]
    for _ in range(5):
        q = rng.standard_normal(DIM).astype(np.float32)
        assert_same_results(col.query(q, k=10), reference_search(vectors, ids, q, metric, 10))
    # More like this: the item's own vector, itself left out.
    got = col.query(id="item7", k=5)
    expected = reference_search(vectors, ids, vectors[7], metric, 6)
    assert_same_results(got, [e for e in expected if e[0] != "item7"][:5])
    # exclude
    q = rng.standard_normal(DIM).astype(np.float32)
    first = [r.id for r in col.query(q, k=3)]
    got = col.query(q, k=5, exclude=first)
    assert_same_results(got, [e for e in reference_search(vectors, ids, q, metric, 8) if e[0] not in first][:5])
    assert col.describe()["index"] == "exact" and col.describe()["count"] == 300


def test_filters_match_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    col = CollectionStore(tmp_path).create("c", dimension=DIM, metric="cosine")
    items = make_items(rng, 400)
    col.upsert(items)
    vectors = np.stack([it.vector for it in items])
    ids = [it.id for it in items]
    filters = [
        {"genre": "jazz"},
        {"genre": {"$in": ["jazz", "folk"]}},
        {"genre": {"$ne": "jazz"}},
        {"genre": {"$nin": ["jazz", "rock"]}, "year": {"$gte": 1990}},
        {"year": {"$gt": 1975, "$lte": 2000}},
        {"tags": "t2"},
        {"tags": {"$in": ["t4", "t0"]}, "genre": "pop"},
        {"year": 1967.0},  # numbers compare by value
        {"genre": "nothing"},
    ]
    for flt in filters:
        allowed = {it.id for it in items if matches(it.metadata or {}, flt)}
        q = rng.standard_normal(DIM).astype(np.float32)
        got = col.query(q, k=20, filter=flt)
        assert_same_results(got, reference_search(vectors, ids, q, "cosine", 20, allowed))
        assert all(matches(r.metadata, flt) for r in got)


def test_query_without_waiting_answers_the_same_or_steps_aside(tmp_path):
    """`query(wait=False)` (what the server runs on its event loop) gives the answer `query()` gives, or None at
    once: for a filter that reads every item's metadata, or while another thread holds the collection's locks."""
    rng = np.random.default_rng(8)
    col = CollectionStore(tmp_path).create("c", dimension=DIM, metric="cosine")
    items = make_items(rng, 300)
    col.upsert(items)
    q = rng.standard_normal(DIM).astype(np.float32)
    for kwargs in ({"k": 10}, {"k": 5, "filter": {"genre": "jazz"}}, {"k": 5, "filter": {"tags": {"$in": ["t1"]}}},
                   {"id": "item3", "k": 4}, {"k": 3, "exclude": ["item1"]}):
        vector = None if "id" in kwargs else q
        quick = col.query(vector, **kwargs, wait=False)
        assert quick is not None and quick == col.query(vector, **kwargs)
    assert col.query(q, k=5, filter={"year": {"$gte": 1990}}, wait=False) is None  # reads every item's metadata
    assert col.query(q, k=200, wait=False) is None  # k past MAX_QUICK_K
    with pytest.raises(InvalidRequestError):  # bad input is still refused at once
        col.query(q, k=0, wait=False)
    held, release = threading.Event(), threading.Event()

    def hold_lock():
        with col._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(30)
    try:
        # None, not the answer: waiting would have lasted until the holder's 30 s ran out, then answered
        assert col.query(q, k=10, wait=False) is None
    finally:
        release.set()
        holder.join()
    assert col.query(q, k=10, wait=False) == col.query(q, k=10)


def test_upsert_replace_delete_get_and_reload(tmp_path):
    rng = np.random.default_rng(2)
    store = CollectionStore(tmp_path)
    col = store.create("c", dimension=DIM, metric="dot")
    items = make_items(rng, 50)
    col.upsert(items)
    new_vector = rng.standard_normal(DIM).astype(np.float32)
    col.upsert([Item(id="item3", vector=new_vector, metadata={"genre": "new"}, text="hello")])
    assert col.delete(["item5", "item6", "nope"]) == 2
    got = col.get("item3")
    assert got["metadata"] == {"genre": "new"} and got["text"] == "hello"
    np.testing.assert_array_equal(np.array(got["vector"], np.float32), new_vector)
    with pytest.raises(NotFoundError):
        col.get("item5")
    q = rng.standard_normal(DIM).astype(np.float32)
    before = col.query(q, k=50)
    assert len(col) == 48 and {"item5", "item6"}.isdisjoint(r.id for r in before)
    store.close()

    store2 = CollectionStore(tmp_path)  # a restart
    col2 = store2.get("c")
    assert len(col2) == 48
    assert col2.query(q, k=50) == before
    with pytest.raises(NotFoundError):
        col2.get("item6")  # deletes never come back
    assert col2.get("item3")["metadata"] == {"genre": "new"}
    with pytest.raises(ConflictError):
        store2.create("c", dimension=DIM)
    store2.delete("c")
    assert CollectionStore(tmp_path).list() == []


def test_bad_input_names_the_field(tmp_path):
    col = CollectionStore(tmp_path).create("c", dimension=4, metric="cosine")
    cases = [
        (lambda: col.upsert([Item("a", np.ones(4)), Item("b", np.ones(3))]), "items[1].vector"),
        (lambda: col.upsert([Item("a", np.array([1, np.nan, 0, 0]))]), "items[0].vector"),
        (lambda: col.upsert([Item("a", np.array([1, np.inf, 0, 0]))]), "items[0].vector"),
        (lambda: col.upsert([Item("a", np.zeros(4))]), "items[0].vector"),
        (lambda: col.upsert([Item("a", np.ones(4)), Item("a", np.ones(4))]), "items[1].id"),
        (lambda: col.upsert([Item("", np.ones(4))]), "items[0].id"),
        (lambda: col.upsert([Item("a", np.ones(4), {"x": float("nan")})]), "items[0].metadata"),
        (lambda: col.upsert([Item("a", np.ones(4), {"x": object()})]), "items[0].metadata"),
        (lambda: col.query(np.ones(4), k=0), "k"),
        (lambda: col.query(np.ones(4), k=100_000), "k"),
        (lambda: col.query(np.ones(5), k=1), "vector"),
        (lambda: col.query(np.ones(4), k=1, filter={"year": {"$gt": "1990"}}), "filter.year.$gt"),
        (lambda: col.query(np.ones(4), k=1, filter={"genre": {"a": 1}}), "filter.genre.a"),
        (lambda: col.query(np.ones(4), k=1, filter={"genre": [1, 2]}), "filter.genre"),
        (lambda: col.query(np.ones(4), k=1, filter={"genre": {"$in": "jazz"}}), "filter.genre.$in"),
    ]
    for fn, param in cases:
        with pytest.raises(InvalidRequestError) as info:
            fn()
        assert info.value.param == param, (param, info.value.message)
        assert param.split(".")[0].split("[")[0] in info.value.message
    with pytest.raises(NotFoundError):
        col.query(id="missing", k=1)
    assert len(col) == 0  # nothing half-written


def test_hnsw_recall_and_exact_filters(tmp_path):
    """Past exact_max_vectors a background indexer builds the graph: recall vs exact; a filter with few matches
    is answered exactly, one with many through the graph (every result matches; recall vs exact >= 0.95)."""
    rng = np.random.default_rng(3)
    n, dim = 6000, 32
    col = CollectionStore(tmp_path, exact_max_vectors=1000).create("c", dimension=dim, metric="cosine")
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    ids = [f"v{i}" for i in range(n)]
    for start in range(0, n, 1000):
        col.upsert([Item(ids[i], vectors[i], {"group": i % 10, "rare": i % 100 == 7})
                    for i in range(start, start + 1000)])
        # acknowledged = searchable at once, indexed or not: an item's own vector finds it first
        i = start + 999
        assert col.query(vectors[i], k=1)[0].id == ids[i]
    assert col.wait_indexed(timeout_s=300)
    described = col.describe()
    assert described["index"] == "hnsw" and described["unindexed"] == 0 and described["count"] == n
    hits = filtered_hits = 0
    in_group = {ids[i] for i in range(n) if i % 10 == 3}
    rare = {ids[i] for i in range(n) if i % 100 == 7}
    for _ in range(50):
        q = rng.standard_normal(dim).astype(np.float32)
        truth = {e[0] for e in reference_search(vectors, ids, q, "cosine", 10)}
        hits += len(truth & {r.id for r in col.query(q, k=10)})
        # 600 matches (600^2 > 5 * 10 * 6000): the graph, searched deeper, keeps only matches.
        got = col.query(q, k=10, filter={"group": 3})
        true_score = dict(reference_search(vectors, ids, q, "cosine", n, in_group))
        assert len(got) == 10 and all(r.id in in_group and abs(r.score - true_score[r.id]) < 2e-3 for r in got)
        filtered_hits += len({e[0] for e in reference_search(vectors, ids, q, "cosine", 10, in_group)}
                             & {r.id for r in got})
        # 60 matches: exact over the matches, scored on the graph's float16 copies.
        got = col.query(q, k=10, filter={"rare": True})
        expected = reference_search(vectors, ids, q, "cosine", 10, rare)
        true_score = dict(reference_search(vectors, ids, q, "cosine", n, rare))
        assert all(r.id in rare and abs(r.score - true_score[r.id]) < 2e-3 for r in got)
        tenth = expected[-1][1]
        assert {e[0] for e in expected if e[1] > tenth + 4e-3} <= {r.id for r in got}  # only near-ties may swap
    assert hits / 500 >= 0.95
    assert filtered_hits / 500 >= 0.95
    col.delete(ids[:100])
    q = rng.standard_normal(dim).astype(np.float32)
    assert set(ids[:100]).isdisjoint(r.id for r in col.query(q, k=200))


def test_compaction_and_leftovers_reload(tmp_path):
    rng = np.random.default_rng(4)
    store = CollectionStore(tmp_path, exact_max_vectors=300, compact_wal_bytes=20_000)
    col = store.create("c", dimension=DIM, metric="l2")
    items = make_items(rng, 600)
    for start in range(0, 600, 50):
        col.upsert(items[start:start + 50])
    col.delete([f"item{i}" for i in range(0, 600, 7)])
    assert col._generation > 1 and col.describe()["index"] == "hnsw"
    state = {i: col.get(i) for i in col._key_by_id}
    store.close()
    # A compaction that died before its rename leaves a .tmp directory: ignored and removed.
    (tmp_path / "c" / "snapshot-999.tmp").mkdir()
    col2 = CollectionStore(tmp_path, exact_max_vectors=300, compact_wal_bytes=20_000).get("c")
    assert not (tmp_path / "c" / "snapshot-999.tmp").exists()
    assert len(col2) == 600 - 86 and set(col2._key_by_id) == set(state)
    for item_id, item in state.items():  # vectors: float32 in `flat`, float16 once in the graph
        got = col2.get(item_id)
        assert got["metadata"] == item["metadata"]
        np.testing.assert_allclose(got["vector"], item["vector"], rtol=2e-3, atol=2e-3)
    assert col2.wait_indexed(timeout_s=120)
    for item_id in list(state)[:20]:  # every item is found by its own vector
        assert col2.query(np.array(state[item_id]["vector"], np.float32), k=1)[0].id == item_id
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(("wal", "snapshot"))) == [
        f"snapshot-{col2._generation}", f"wal-{col2._generation}.log"]


def test_clean_close_snapshots_the_graph(tmp_path):
    rng = np.random.default_rng(7)
    store = CollectionStore(tmp_path, exact_max_vectors=200)
    col = store.create("c", dimension=DIM)
    col.upsert(make_items(rng, 600))
    assert col.wait_indexed(timeout_s=120)
    store.close()
    reopened = CollectionStore(tmp_path, exact_max_vectors=200).get("c")
    assert reopened._wal.num_records == 0  # nothing to replay: the graph came from the snapshot
    assert reopened.describe()["index"] == "hnsw" and reopened.describe()["unindexed"] == 0 and len(reopened) == 600


def test_torn_last_record_is_dropped(tmp_path):
    rng = np.random.default_rng(5)
    store = CollectionStore(tmp_path)
    col = store.create("c", dimension=DIM)
    items = make_items(rng, 30)
    for i in range(3):
        col.upsert(items[10 * i:10 * i + 10])
    col._wal.close()  # as a crash leaves it: no clean-close snapshot
    wal_path = tmp_path / "c" / "wal-0.log"
    full = wal_path.read_bytes()
    ends, offset = [], 0
    while offset < len(full):  # record boundaries from the framing: u32 length, u32 crc, payload
        offset += 8 + int.from_bytes(full[offset:offset + 4], "little")
        ends.append(offset)
    assert len(ends) == 3 and ends[-1] == len(full)
    # Cut the last record anywhere inside it (header or payload): the first two batches load, the third is gone.
    for cut in (len(full) - 1, (ends[1] + ends[2]) // 2, ends[1] + 3):
        wal_path.write_bytes(full[:cut])
        col2 = CollectionStore(tmp_path).get("c")
        assert sorted(col2._key_by_id) == sorted(it.id for it in items[:20])
        assert wal_path.stat().st_size == ends[1]  # truncated back to the last whole record
        col2.upsert(items[20:21])  # appends after valid data
        col2._wal.close()
        assert len(CollectionStore(tmp_path).get("c")) == 21
    # A flipped byte in the last record's payload: checksum mismatch, dropped the same way.
    damaged = bytearray(full)
    damaged[-5] ^= 0xFF
    wal_path.write_bytes(bytes(damaged))
    assert len(CollectionStore(tmp_path).get("c")) == 20
    # The same damage in the middle record is corruption, not a torn write: loading refuses.
    damaged = bytearray(full)
    damaged[ends[0] + 20] ^= 0xFF
    wal_path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptLogError):
        CollectionStore(tmp_path)


WRITER = r"""
import sys, json, numpy as np
from inferd.collections import CollectionStore, Item
store = CollectionStore(sys.argv[1], exact_max_vectors=int(sys.argv[3]), compact_wal_bytes=int(sys.argv[4]))
col = store.get("c") if store.list() else store.create("c", dimension=8, metric="cosine")
rng = np.random.default_rng(int(sys.argv[2]))
batch = 0
while True:
    ids = [f"r{sys.argv[2]}-{batch}-{j}" for j in range(5)]
    col.upsert([Item(i, rng.standard_normal(8).astype(np.float32) + 0.1, {"batch": batch, "run": sys.argv[2]})
                for i in ids])
    if batch % 3 == 2:
        col.delete([ids[0]])
        ids = ids[1:]
        print("del", f"r{sys.argv[2]}-{batch}-0", flush=True)
    print("ack", json.dumps(ids), batch, flush=True)
    batch += 1
"""


def test_kill_9_keeps_every_acknowledged_write(tmp_path):
    """A writer subprocess is SIGKILLed at random moments (compactions included); every acked id survives."""
    rng = np.random.default_rng(6)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    acked: dict[str, int] = {}
    deleted: set[str] = set()
    for run in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(run), "40", "6000"],
                                stdout=subprocess.PIPE, env=env, text=True)
        first = proc.stdout.readline()  # the writer is up (imports take seconds on a busy machine)
        time.sleep(rng.uniform(0, 1.0))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        out = first + out
        for line in out.splitlines(keepends=True):
            if not line.endswith("\n"):  # print() writes a line in pieces: the kill can cut the last one short
                continue
            parts = line[:-1].split(" ", 1)
            if parts[0] == "ack":
                ids_json, batch = parts[1].rsplit(" ", 1)
                for i in json.loads(ids_json):
                    acked[i] = int(batch)
            elif parts[0] == "del":
                deleted.add(parts[1])
        col = CollectionStore(tmp_path, exact_max_vectors=40, compact_wal_bytes=6000).get("c")
        for item_id, batch in acked.items():
            assert col.get(item_id, include_vector=False)["metadata"]["batch"] == batch
        for item_id in deleted:
            with pytest.raises(NotFoundError):
                col.get(item_id)
        col.close()
    assert len(acked) > 50


def test_usearch_is_imported_in_one_module_lazily():
    importers = [p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "inferd").rglob("*.py")
                 if re.search(r"^\s*(import usearch|from usearch)", p.read_text(), flags=re.MULTILINE)]
    assert importers == ["inferd/collections/index.py"]
    code = "import sys, inferd.collections, inferd.collections.client; assert 'usearch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


STRESS = r"""
import sys, threading, numpy as np
from inferd.collections import CollectionStore, Item
from inferd.collections.collection import NotFoundError
col = CollectionStore(sys.argv[1], exact_max_vectors=300).create("s", dimension=48, metric="cosine")
rng = np.random.default_rng(0)
x = rng.standard_normal((6000, 48)).astype(np.float32)
errors = []
stop = threading.Event()
def reader(seed):
    r = np.random.default_rng(seed)
    while not stop.is_set():
        try:
            col.describe()
            flt = {"g": int(r.integers(3))} if seed % 2 else None
            res = col.query(r.standard_normal(48).astype(np.float32), k=5, filter=flt)
            if res:
                try:
                    col.get(res[0].id)
                except NotFoundError:  # deleted between the query and the get: only an id this loop deletes
                    i = int(res[0].id)
                    if (i - i // 200 * 200) % 9:
                        raise
        except Exception as e:
            errors.append(repr(e))
readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
for t in readers:
    t.start()
for s in range(0, 6000, 200):
    col.upsert([Item(str(i), x[i], {"g": i % 3}) for i in range(s, s + 200)])
    col.delete([str(i) for i in range(s, s + 200, 9)])
col.wait_indexed(300)
stop.set()
for t in readers:
    t.join()
assert not errors, errors[:3]
print("ok", len(col))
"""


def test_graph_reads_while_the_indexer_inserts(tmp_path):
    """Queries, describe and get from 3 threads while upserts, deletes and the indexer run (in a subprocess:
    a crash inside the index library shows up as a failed run, not a dead test session)."""
    proc = subprocess.run([sys.executable, "-c", STRESS, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", str(6000 - 30 * 23)]  # 23 of every 200 deleted
