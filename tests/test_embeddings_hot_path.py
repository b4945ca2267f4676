"""`inferd serve` answers POST /v1/embeddings (JSON bodies) through a bare ASGI handler ahead of FastAPI
(`HotPaths`, routes/embeddings.py). The reference is the FastAPI route itself, on the same app and the same
loaded engine: every body below, good or bad, must get the same status, the same error body (param and message)
and the same vectors, byte for byte, through either door; the guard's checks (API key, body size), the response
cache and the metrics behave alike. The vectors themselves are checked against sentence-transformers through a
real `inferd serve` (which takes the hot path) in tests/test_embeddings_server.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from inferd.server.app import HotPaths, build_app
from inferd.server.state import ServerOptions
from inferd.serving import ModelKind, ModelSpec

EMBED_MODEL = "all-minilm-l6-v2"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY_BYTES = 1 << 20


@pytest.fixture(scope="module")
def doors(embedding_model_dir: Path):
    """(hot, fastapi): clients of the same app and engine, through HotPaths and straight to FastAPI."""
    from inferd.embeddings import AsyncEmbedEngine

    engine = AsyncEmbedEngine.from_path(embedding_model_dir, {"num_threads": 1})
    spec = ModelSpec(name=EMBED_MODEL, source=str(embedding_model_dir), kind=ModelKind.EMBED)
    app = build_app(ServerOptions(api_keys=(KEY,), max_body_bytes=MAX_BODY_BYTES), loaded=[(spec, engine)])
    with TestClient(HotPaths(app, app.state.inferd)) as hot:  # runs the app's lifespan: the engine starts
        yield hot, TestClient(app)


def _post(client: TestClient, body: bytes | str, content_type: str = "application/json", headers: dict | None = None):
    content = body.encode() if isinstance(body, str) else body
    return client.post("/v1/embeddings", content=content, headers={"content-type": content_type, **AUTH, **(headers or {})})


LONG_TEXT = "word " * 400  # 402 tokens, over the model's 256
_GOOD = [  # (body, number of vectors)
    ({"model": EMBED_MODEL, "input": "The cat sat on the mat."}, 1),
    ({"model": EMBED_MODEL, "input": ["Ünïcödé and emoji 🎉", "def f(x):\n    return x * 2", "a"],
      "encoding_format": "base64"}, 3),
    ({"input": [101, 7592, 2088, 102]}, 1),  # no model: the only embedding model
    ({"model": EMBED_MODEL, "input": [[101, 7592, 102], [101, 2088, 2088, 102]], "dimensions": 16}, 2),
    ({"model": EMBED_MODEL, "input": ["short", LONG_TEXT], "truncate": True, "user": "u", "unknown_field": [1]}, 2),
    ({"model": EMBED_MODEL, "input": [[7592] * 300], "truncate": True}, 1),
]
_BAD = [
    "",  # no body
    "null",
    "[1, 2]",
    '"just a string"',
    '{"model": "all-minilm-l6-v2", "input": ',  # cut JSON
    '{"model": "all-minilm-l6-v2", "input": "tab\tinside"}',  # a raw control character: not JSON
    '{"model": "all-minilm-l6-v2", "input": "x"} trailing',
    json.dumps({"model": EMBED_MODEL}),  # input missing
    json.dumps({"model": 5, "input": "x"}),
    json.dumps({"model": "no-such-model", "input": "x"}),
    json.dumps({"model": EMBED_MODEL, "input": "x", "encoding_format": "int8"}),
    json.dumps({"model": EMBED_MODEL, "input": "x", "dimensions": 0}),
    json.dumps({"model": EMBED_MODEL, "input": "x", "dimensions": "3"}),
    json.dumps({"model": EMBED_MODEL, "input": "x", "dimensions": 3.0}),
    json.dumps({"model": EMBED_MODEL, "input": "x", "dimensions": 385}),
    json.dumps({"model": EMBED_MODEL, "input": "x", "truncate": "yes"}),
    json.dumps({"model": EMBED_MODEL, "input": "x", "cache": 1}),
    json.dumps({"model": EMBED_MODEL, "input": ["ok", ""]}),
    json.dumps({"model": EMBED_MODEL, "input": []}),
    json.dumps({"model": EMBED_MODEL, "input": {"text": "x"}}),
    json.dumps({"model": EMBED_MODEL, "input": ["x", 5]}),
    json.dumps({"model": EMBED_MODEL, "input": [[101, 40000, 102]]}),
    json.dumps({"model": EMBED_MODEL, "input": [[101, True, 102]]}),
    json.dumps({"model": EMBED_MODEL, "input": [[101, 1.5, 102]]}),
    json.dumps({"model": EMBED_MODEL, "input": ["x"] * 2049}),
    json.dumps({"model": EMBED_MODEL, "input": ["short", LONG_TEXT]}),
    json.dumps({"model": EMBED_MODEL, "input": [[7592] * 300]}),
]


def _same_answer(hot, fastapi, headers: tuple[str, ...] = ("retry-after", "x-inferd-cache")) -> None:
    assert hot.status_code == fastapi.status_code, (hot.text, fastapi.text)
    assert hot.content == fastapi.content
    assert hot.headers["content-type"] == fastapi.headers["content-type"] == "application/json"
    for name in headers:
        assert hot.headers.get(name) == fastapi.headers.get(name), name


@pytest.mark.parametrize("body", _BAD, ids=lambda b: b[:40])
def test_bad_bodies_get_the_fastapi_routes_error(doors, body: str) -> None:
    hot, fastapi = doors
    answers = [_post(hot, body), _post(fastapi, body)]
    _same_answer(*answers)
    assert answers[0].status_code in (400, 404)
    error = answers[0].json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"


def test_good_bodies_get_the_same_vectors_and_cache_answers(doors) -> None:
    hot, fastapi = doors
    for index, (body, num_vectors) in enumerate(_GOOD):
        # Alternate which door computes first: the second one meets the first one's cached vectors.
        first, second = (hot, fastapi) if index % 2 else (fastapi, hot)
        miss = _post(first, json.dumps(body))
        assert miss.status_code == 200, miss.text
        assert miss.headers["x-inferd-cache"] == "miss"
        hit = _post(second, json.dumps(body))
        assert hit.headers["x-inferd-cache"] == "hit"
        _same_answer(miss, hit, headers=())
        fresh = [_post(door, json.dumps({**body, "cache": False})) for door in (hot, fastapi)]
        _same_answer(*fresh)
        assert "x-inferd-cache" not in fresh[0].headers
        assert fresh[0].content == miss.content  # a fresh computation gives the cached vectors bitwise
        data = miss.json()
        assert data["model"] == EMBED_MODEL and len(data["data"]) == num_vectors


def test_charset_and_large_bodies(doors) -> None:
    hot, fastapi = doors
    body = json.dumps({"model": EMBED_MODEL, "input": ["a sentence"], "cache": False})
    _same_answer(_post(hot, body, "application/json; charset=utf-8"), _post(fastapi, body, "Application/JSON"))
    # >= 64 KiB: validated on a worker thread and tokenized there (both doors)
    texts = [f"sentence {i} " + "about the weather and the market " * 8 for i in range(300)]
    large = json.dumps({"model": EMBED_MODEL, "input": texts, "cache": False})
    assert len(large) > 64 << 10
    answers = [_post(hot, large), _post(fastapi, large)]
    _same_answer(*answers)
    assert answers[0].status_code == 200 and len(answers[0].json()["data"]) == 300
    bad_large = json.dumps({"model": EMBED_MODEL, "input": texts[:-1] + [7], "dimensions": "x"})
    _same_answer(_post(hot, bad_large), _post(fastapi, bad_large))
    cut_large = large[:-2]
    _same_answer(_post(hot, cut_large), _post(fastapi, cut_large))


def test_guard_checks_and_other_content_types(doors) -> None:
    hot, fastapi = doors
    body = json.dumps({"model": EMBED_MODEL, "input": "x"}).encode()
    for door in (hot, fastapi):
        no_key = door.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
        wrong_key = _post(door, body, headers={"Authorization": "Bearer other"})
        assert wrong_key.status_code == 401
    too_large = b'{"input": "' + b"x" * MAX_BODY_BYTES + b'"}'
    _same_answer(_post(hot, too_large), _post(fastapi, too_large))
    assert _post(hot, too_large).status_code == 413
    not_utf8 = b'{"input": "\xff"}'
    _same_answer(_post(hot, not_utf8), _post(fastapi, not_utf8))
    # Not JSON by its type: FastAPI's own path in both cases
    _same_answer(_post(hot, body, "text/plain"), _post(fastapi, body, "text/plain"))


def _requests_total(client: TestClient, status: str) -> float:
    text = client.get("/metrics", headers=AUTH).text
    pattern = rf'^inferd:requests_total\{{[^}}]*model_name="{EMBED_MODEL}"[^}}]*status="{status}"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, flags=re.M))


def test_metrics_count_hot_path_requests(doors) -> None:
    hot, _fastapi = doors
    ok_before, error_before = _requests_total(hot, "ok"), _requests_total(hot, "error")
    for _ in range(3):
        assert _post(hot, json.dumps({"model": EMBED_MODEL, "input": "counted"})).status_code == 200
    assert _post(hot, json.dumps({"model": EMBED_MODEL, "input": ""})).status_code == 400
    assert _requests_total(hot, "ok") == ok_before + 3
    assert _requests_total(hot, "error") == error_before + 1
