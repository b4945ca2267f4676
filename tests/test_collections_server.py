"""The collections API through a real `inferd serve` subprocess (tests/server_fixtures.py).

References: the in-process Python API (`CollectionStore`) on the same items must answer identically; numpy
brute force for exact results; the server's own /v1/embeddings (official `openai` client) for text items;
a restart (SIGKILL, then a new process on the same directory) for durability.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from inferd.collections import CollectionStore, Item
from inferd.collections.client import CollectionsAPIError, CollectionsClient
from server_fixtures import start_inferd_server, stop_inferd_server

EMBED_MODEL = "all-minilm-l6-v2"
# The server serves the embedding model alone: collections need nothing else.
SERVED_MODEL = EMBED_MODEL
SERVER_ARGS: tuple[str, ...] = ()
DIM = 24


def start(collections_dir: Path):
    return start_inferd_server(SERVER_ARGS, model=SERVED_MODEL, env={"INFERD_COLLECTIONS_DIR": str(collections_dir)})


@pytest.fixture(scope="module")
def server(tmp_path_factory, inferd_home):
    collections_dir = tmp_path_factory.mktemp("collections")
    srv = start(collections_dir)
    try:
        yield srv, collections_dir
    finally:
        stop_inferd_server(srv.process)


def items_for(rng: np.random.Generator, n: int, prefix: str = "i") -> list[dict]:
    colours = ["red", "green", "blue"]
    return [{"id": f"{prefix}{i}", "vector": rng.standard_normal(DIM).astype(np.float32).tolist(),
             "metadata": {"colour": colours[i % 3], "size": i % 17, "tags": [f"t{i % 4}"]}} for i in range(n)]


def test_http_answers_equal_python_api_and_numpy(server, tmp_path):
    srv, _ = server
    rng = np.random.default_rng(0)
    items = items_for(rng, 600)
    client = CollectionsClient(srv.base_url)
    created = client.create("same", dimension=DIM, metric="cosine")
    assert created["dimension"] == DIM and created["count"] == 0 and created["index"] == "exact"
    for start_ in range(0, len(items), 200):
        batch = items[start_:start_ + 200]
        if start_ == 200:  # numpy vectors travel as base64 float32: the same answers as JSON numbers
            batch = [{**it, "vector": np.array(it["vector"], np.float32)} for it in batch]
        assert client.upsert("same", batch)["upserted"] == 200
    local = CollectionStore(tmp_path).create("same", dimension=DIM, metric="cosine")
    local.upsert([Item(it["id"], np.array(it["vector"], np.float32), it["metadata"]) for it in items])

    x = np.array([it["vector"] for it in items], np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [it["id"] for it in items]
    queries = [
        {"k": 10},
        {"k": 7, "filter": {"colour": "red"}},
        {"k": 5, "filter": {"colour": {"$in": ["green", "blue"]}, "size": {"$gte": 5, "$lt": 12}}},
        {"k": 5, "filter": {"tags": "t1"}, "exclude": ["i1", "i5"]},
    ]
    for body in queries:
        q = rng.standard_normal(DIM).astype(np.float32)
        got = client.query("same", vector=q, k=body["k"], filter=body.get("filter"), exclude=body.get("exclude"))
        expected = local.query(q, k=body["k"], filter=body.get("filter"), exclude=body.get("exclude", ()))
        assert [(r["id"], r["score"], r["metadata"]) for r in got] == [(e.id, e.score, e.metadata) for e in expected]
        # and the exact answer, by numpy
        scores = x @ (q / np.linalg.norm(q))
        allowed = [i for i, it in enumerate(items) if _matches(it["metadata"], body.get("filter") or {})
                   and it["id"] not in body.get("exclude", [])]
        best = sorted(allowed, key=lambda i: -scores[i])[: body["k"]]
        assert [r["id"] for r in got] == [ids[i] for i in best]
        np.testing.assert_allclose([r["score"] for r in got], scores[best], rtol=1e-5, atol=1e-6)
    more = client.query("same", id="i3", k=4)
    assert [r["id"] for r in more] == [e.id for e in local.query(id="i3", k=4)] and "i3" not in {r["id"] for r in more}
    got_item = client.get("same", "i3")
    assert got_item["metadata"] == items[3]["metadata"]
    np.testing.assert_allclose(got_item["vector"], x[3], rtol=1e-6, atol=1e-7)
    described = client.describe("same")
    assert described["count"] == 600 and described["index_bytes"] > 600 * DIM * 4 and described["disk_bytes"] > 0
    assert "same" in {c["name"] for c in client.list()}


def _matches(metadata: dict, flt: dict) -> bool:
    for name, cond in flt.items():
        value = metadata.get(name)
        values = value if isinstance(value, list) else [value]
        ops = cond if isinstance(cond, dict) else {"$eq": cond}
        for op, want in ops.items():
            ok = {"$eq": lambda: want in values, "$in": lambda: any(v in want for v in values),
                  "$gte": lambda: any(v >= want for v in values), "$lt": lambda: any(v < want for v in values)}[op]()
            if not ok:
                return False
    return True


def test_bad_input_gets_4xx_naming_the_field_and_the_server_lives_on(server):
    srv, _ = server
    client = CollectionsClient(srv.base_url)
    client.create("strict", dimension=4, metric="cosine")
    client.upsert("strict", [{"id": "ok", "vector": [1, 0, 0, 0], "metadata": {"year": 1999, "genre": "jazz"}}])
    http = httpx.Client(base_url=srv.base_url, timeout=30)

    def post(path: str, raw: str) -> httpx.Response:
        return http.post(path, content=raw, headers={"Content-Type": "application/json"})

    cases = [
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": [1, 2]}]}'), 400, "items[0].vector"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": [1, NaN, 0, 0]}]}'), 400,
         "items[0].vector"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": [1, 0, 0, 0]}, '
                                              '{"id": "b", "vector": [1, Infinity, 0, 0]}]}'), 400, "items[1].vector"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": [1, 0, 0, 1e39]}]}'), 400,
         "items[0].vector"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "text": "no model here"}]}'), 400,
         "items[0].text"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a"}]}'), 400, "items[0]"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": "not base64!"}]}'), 400,
         "items[0].vector"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": "AACAPw=="}]}'), 400,
         "items[0].vector"),  # one float32, the collection has 4
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": [1, 0, 0, 0]}'), 400, None),
        (post("/v1/collections/strict/items", '{"items": "x"}'), 400, "items"),
        (post("/v1/collections/strict/items", '{"items": [{"id": "a", "vector": [1, 0, 0, 0], '
                                              '"metadata": {"x": NaN}}]}'), 400, "items[0].metadata"),
        (post("/v1/collections/strict/items", '{"items": [{"id": 5, "vector": [1, 0, 0, 0]}]}'), 400, "items"),
        (post("/v1/collections/strict/query", '{"vector": [1, 0, 0, 0], "k": 0}'), 400, "k"),
        (post("/v1/collections/strict/query", '{"vector": [1, 0, 0, 0], "k": 1001}'), 400, "k"),
        (post("/v1/collections/strict/query", '{"vector": [1, 0, 0]}'), 400, "vector"),
        (post("/v1/collections/strict/query", '{"vector": "AACAPw=="}'), 400, "vector"),
        (post("/v1/collections/strict/query", '{"vector": [1, 0, 0, 0], "filter": {"year": {"$gt": "1990"}}}'),
         400, "filter.year.$gt"),
        (post("/v1/collections/strict/query", '{"vector": [1, 0, 0, 0], "filter": {"genre": {"x": 1}}}'),
         400, "filter.genre.x"),
        (post("/v1/collections/strict/query", '{"vector": [1, 0, 0, 0], "filter": {"genre": {"a": [1]}}}'),
         400, "filter.genre.a"),
        (post("/v1/collections/strict/query", '{"k": 3}'), 400, "text"),
        (post("/v1/collections/strict/query", '{"id": "missing"}'), 404, "id"),
        (post("/v1/collections/nope/query", '{"vector": [1, 0, 0, 0]}'), 404, "name"),
        (post("/v1/collections/nope/items", '{"items": [{"id": "a", "vector": [1]}]}'), 404, "name"),
        (http.get("/v1/collections/nope"), 404, "name"),
        (http.delete("/v1/collections/nope"), 404, "name"),
        (http.get("/v1/collections/strict/items/missing"), 404, "id"),
        (http.delete("/v1/collections/strict/items/missing"), 404, "id"),
        (post("/v1/collections", '{"name": "strict", "dimension": 4}'), 409, "name"),
        (post("/v1/collections", '{"name": "bad/name", "dimension": 4}'), 400, "name"),
        (post("/v1/collections", '{"name": "x", "dimension": 0}'), 400, "dimension"),
        (post("/v1/collections", '{"name": "x", "dimension": 4, "metric": "hamming"}'), 400, "metric"),
        (post("/v1/collections", '{"name": "x"}'), 400, "model"),
    ]
    for response, status, param in cases:
        assert response.status_code == status, (param, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (param, error)
        assert error["message"]
        if status == 400 and param is not None:  # the message names the field too
            assert param.split(".")[0].split("[")[0] in error["message"], error
        # the server keeps serving
        assert client.query("strict", vector=[1, 0, 0, 0], k=1)[0]["id"] == "ok"
    assert client.describe("strict")["count"] == 1  # nothing half-written


def test_text_collection_embeds_with_the_served_model(server):
    """Text items are embedded by the served model: the stored vector equals /v1/embeddings' for that text."""
    from openai import OpenAI

    srv, _ = server
    client = CollectionsClient(srv.base_url)
    texts = {"cats": "Cats sleep most of the day and hunt at night.",
             "dogs": "Dogs are loyal companions that love long walks.",
             "stocks": "The stock market fell sharply after the interest rate decision.",
             "bonds": "Bond yields rose as investors priced in inflation."}
    created = client.create("texts", model=EMBED_MODEL)
    oai = OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused")
    reference = oai.embeddings.create(model=EMBED_MODEL, input=list(texts.values()))
    dim = len(reference.data[0].embedding)
    assert created["dimension"] == dim and created["model"] == EMBED_MODEL
    client.upsert("texts", [{"id": k, "text": v, "metadata": {"topic": "pets" if k in ("cats", "dogs") else "money"}}
                            for k, v in texts.items()])
    for (key, text), ref in zip(texts.items(), reference.data):
        item = client.get("texts", key)
        assert item["text"] == text
        a, b = np.array(item["vector"]), np.array(ref.embedding)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9999
    query = "my kitten naps on the sofa"
    by_text = client.query("texts", text=query, k=4)
    query_vector = oai.embeddings.create(model=EMBED_MODEL, input=[query]).data[0].embedding
    by_vector = client.query("texts", vector=query_vector, k=4)
    assert [r["id"] for r in by_text] == [r["id"] for r in by_vector]
    np.testing.assert_allclose([r["score"] for r in by_text], [r["score"] for r in by_vector], atol=1e-4)
    assert by_text[0]["id"] == "cats"
    assert [r["id"] for r in client.query("texts", id="stocks", k=1)] == ["bonds"]


def test_restart_keeps_acknowledged_writes_and_deletes(tmp_path, inferd_home):
    rng = np.random.default_rng(1)
    srv = start(tmp_path)
    try:
        client = CollectionsClient(srv.base_url)
        client.create("keep", dimension=DIM, metric="l2")
        items = items_for(rng, 300)
        for start_ in range(0, 300, 100):
            client.upsert("keep", items[start_:start_ + 100])
        for i in range(0, 300, 10):
            client.delete_item("keep", f"i{i}")
        client.create("gone", dimension=3)
        client.delete("gone")
        q = rng.standard_normal(DIM).astype(np.float32)
        before = client.query("keep", vector=q, k=50)
    finally:
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait()
    srv = start(tmp_path)
    try:
        client = CollectionsClient(srv.base_url)
        assert [c["name"] for c in client.list()] == ["keep"]
        assert client.describe("keep")["count"] == 270
        assert client.query("keep", vector=q, k=50) == before
        for i in range(0, 300, 10):
            with pytest.raises(CollectionsAPIError) as info:
                client.get("keep", f"i{i}")
            assert info.value.status_code == 404
        assert client.get("keep", "i7")["metadata"] == items[7]["metadata"]
    finally:
        stop_inferd_server(srv.process)


def test_cli_verbs_create_load_query_list_delete(server, tmp_path):
    srv, _ = server
    rng = np.random.default_rng(2)
    items = items_for(rng, 250, prefix="c")
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "INFERD_URL": srv.base_url}

    def cli(*args: str) -> object:
        proc = subprocess.run([sys.executable, "-c", "import sys; from inferd.cli import main; sys.exit(main())",
                               "collections", *args], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert cli("create", "cli", "--dimension", str(DIM), "--metric", "dot")["metric"] == "dot"
    loaded = cli("load", "cli", str(path), "--batch-size", "100")
    assert loaded["loaded"] == 250 and loaded["collection"]["count"] == 250
    q = rng.standard_normal(DIM)
    got = cli("query", "cli", "--vector", json.dumps(q.tolist()), "-k", "3", "--filter", '{"colour": "red"}')
    x = np.array([it["vector"] for it in items])
    red = [i for i, it in enumerate(items) if it["metadata"]["colour"] == "red"]
    assert [r["id"] for r in got] == [items[i]["id"] for i in sorted(red, key=lambda i: -(x[i] @ q))[:3]]
    assert "cli" in {c["name"] for c in cli("list")}
    assert cli("delete", "cli")["deleted"] is True
    proc = subprocess.run([sys.executable, "-c", "import sys; from inferd.cli import main; sys.exit(main())",
                           "collections", "query", "cli", "--id", "c1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "404" in proc.stderr
