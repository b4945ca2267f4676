"""The exact response cache (inferd/server/response_cache.py) as users meet it: one real `inferd serve` subprocess
(two names for the default LLM, the default embedding model, two API keys, a 16 KiB cache) and the official
openai client, httpx for raw SSE and /metrics.

References: the server's own answer to the first (engine-computed) request, the engine's own counters in /metrics
(prompt and generation tokens for LLMs, batch sizes for the embedding model: a hit must not move them), and a
fresh computation with `"cache": false` for embeddings. The LRU and the key's canonical JSON are also tested
in-process with exact byte counts.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_fixtures import DEFAULT_MODEL, InferdServer, start_inferd_server, stop_inferd_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EMBED_MODEL = "all-minilm-l6-v2"
OTHER = "other"  # the default LLM served a second time under another name
KEY_1, KEY_2 = "key-one", "key-two"
CAPACITY_BYTES = 16 << 10
CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
CHAT_ENDPOINT = "/v1/chat/completions"
ENGINE_COUNTERS = ("inferd:prompt_tokens_total", "inferd:generation_tokens_total")


# ---------------------------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def server(inferd_home: Path) -> InferdServer:
    server = start_inferd_server(
        ["--api-key", KEY_1, "--api-key", KEY_2, "--response-cache-bytes", f"{CAPACITY_BYTES // 1024}KiB",
         "--kv-cache-memory", "64MiB"],
        model=[DEFAULT_MODEL, f"{OTHER}={DEFAULT_MODEL}", EMBED_MODEL],
    )
    yield server
    stop_inferd_server(server.process)


@pytest.fixture(scope="module")
def http(server: InferdServer) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, timeout=300, headers={"Authorization": f"Bearer {KEY_1}"}) as c:
        yield c


@pytest.fixture(scope="module")
def client(server: InferdServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY_1, max_retries=0, timeout=300)


SCRAPED = ("inferd:prompt_tokens_total", "inferd:generation_tokens_total", "inferd:response_cache_",
           "inferd:batch_size_sum")


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """The series these tests read (only their lines go through prometheus_client's parser: the whole page of
    histograms for three models costs the test process more CPU than the server)."""
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(SCRAPED)]
    samples = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def settled(http: httpx.Client) -> dict:
    """/metrics once two scrapes in a row agree on every engine counter (the engine publishes its stats after a
    step, so the counters of a request just answered may land a moment later)."""
    previous = scrape(http)
    for _ in range(100):
        time.sleep(0.1)
        current = scrape(http)
        if all(metric(current, n, model_name=m) == metric(previous, n, model_name=m)
               for n in ENGINE_COUNTERS for m in (DEFAULT_MODEL, OTHER)):
            return current
        previous = current
    pytest.fail("engine counters never settled")


def engine_tokens(samples: dict, model: str = DEFAULT_MODEL) -> tuple[float, ...]:
    return tuple(metric(samples, n, model_name=model) for n in ENGINE_COUNTERS)


def cache_counts(samples: dict, model: str, endpoint: str) -> tuple[float, float]:
    return (metric(samples, "inferd:response_cache_hits_total", model_name=model, endpoint=endpoint),
            metric(samples, "inferd:response_cache_misses_total", model_name=model, endpoint=endpoint))


def cache_bytes(samples: dict) -> float:
    return sum(v for (name, _), v in samples.items() if name == "inferd:response_cache_bytes")


def without_id(document: dict) -> dict:
    return {k: v for k, v in document.items() if k not in ("id", "created")}


def post(http: httpx.Client, path: str, body: dict, key: str = KEY_1) -> httpx.Response:
    response = http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


def assert_engine_ran(http: httpx.Client, before: dict, model: str = DEFAULT_MODEL) -> dict:
    after = settled(http)
    assert engine_tokens(after, model)[1] > engine_tokens(before, model)[1], "the engine generated nothing"
    return after


# ---------------------------------------------------------------------------------------------- hits


def test_chat_hit_is_the_same_answer_and_skips_the_engine(http: httpx.Client, client: openai.OpenAI) -> None:
    request = dict(model=DEFAULT_MODEL, messages=CHAT, max_tokens=16, temperature=0)
    idle = settled(http)
    first = client.chat.completions.with_raw_response.create(**request)
    assert first.headers["x-inferd-cache"] == "miss"
    after_miss = assert_engine_ran(http, idle)

    second = client.chat.completions.with_raw_response.create(**request, user="someone else")  # user: not in the key
    assert second.headers["x-inferd-cache"] == "hit"
    assert second.headers["server-timing"].startswith("cache;dur=")
    after_hit = settled(http)
    assert engine_tokens(after_hit) == engine_tokens(after_miss)  # the engine did not see the hit
    assert cache_counts(after_hit, DEFAULT_MODEL, CHAT_ENDPOINT) == (
        cache_counts(after_miss, DEFAULT_MODEL, CHAT_ENDPOINT)[0] + 1, cache_counts(after_miss, DEFAULT_MODEL, CHAT_ENDPOINT)[1])
    miss_body, hit_body = first.parse().model_dump(), second.parse().model_dump()
    assert without_id(hit_body) == without_id(miss_body)
    assert hit_body["id"] != miss_body["id"] and hit_body["id"].startswith("chatcmpl-")
    assert miss_body["choices"][0]["message"]["content"]


def test_completions_seeded_n2_hit(http: httpx.Client) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": ["The sky is", "Water is"], "max_tokens": 8, "temperature": 0.9,
            "seed": 1234, "n": 2, "logprobs": 2}
    before = settled(http)
    miss = post(http, "/v1/completions", body)
    assert miss.headers["x-inferd-cache"] == "miss"
    after_miss = assert_engine_ran(http, before)
    reordered = dict(reversed(list(body.items())))  # the key is canonical JSON: field order does not matter
    hit = post(http, "/v1/completions", reordered)
    assert hit.headers["x-inferd-cache"] == "hit"
    assert engine_tokens(settled(http)) == engine_tokens(after_miss)
    assert without_id(hit.json()) == without_id(miss.json())
    assert len(hit.json()["choices"]) == 4


def test_stream_hit_replays_the_same_chunks(http: httpx.Client, client: openai.OpenAI) -> None:
    body = {"model": DEFAULT_MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}
    before = settled(http)
    miss = post(http, CHAT_ENDPOINT, body)
    assert miss.headers["x-inferd-cache"] == "miss"
    after_miss = assert_engine_ran(http, before)
    hit = post(http, CHAT_ENDPOINT, body)
    assert hit.headers["x-inferd-cache"] == "hit"
    assert engine_tokens(settled(http)) == engine_tokens(after_miss)
    miss_events, hit_events = sse_payloads(miss), sse_payloads(hit)
    assert hit_events[-1] == miss_events[-1] == "[DONE]"
    assert len(hit_events) == len(miss_events) > 3
    decoded_miss = [without_id(json.loads(e)) for e in miss_events[:-1]]
    decoded_hit = [without_id(json.loads(e)) for e in hit_events[:-1]]
    assert decoded_hit == decoded_miss
    assert len({json.loads(e)["id"] for e in hit_events[:-1]}) == 1  # one fresh id on every chunk

    # A non-stream request with the same fields is another entry (a stream's chunking is its own).
    non_stream = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    assert post(http, CHAT_ENDPOINT, non_stream).headers["x-inferd-cache"] == "miss"

    # The openai client reads the replayed stream as it reads a live one.
    chunks = list(client.chat.completions.create(**body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = "".join(d["choices"][0]["delta"].get("content", "") for d in decoded_miss if d["choices"])
    assert text == expected and text
    assert chunks[-1].usage.completion_tokens == decoded_miss[-1]["usage"]["completion_tokens"]


# ---------------------------------------------------------------------------------------------- never a wrong hit


def test_other_key_other_field_other_model_never_hit(http: httpx.Client) -> None:
    body = {"model": DEFAULT_MODEL, "messages": CHAT, "max_tokens": 10, "temperature": 0}
    post(http, CHAT_ENDPOINT, body)
    assert post(http, CHAT_ENDPOINT, body).headers["x-inferd-cache"] == "hit"
    variants = [
        (body, KEY_2, DEFAULT_MODEL),  # another API key never sees this key's entry
        ({**body, "max_tokens": 11}, KEY_1, DEFAULT_MODEL),
        ({**body, "top_p": 0.5}, KEY_1, DEFAULT_MODEL),  # greedy either way, yet another request
        ({**body, "seed": 7}, KEY_1, DEFAULT_MODEL),
        ({**body, "response_format": {"type": "text"}}, KEY_1, DEFAULT_MODEL),
        ({**body, "some_future_field": 1}, KEY_1, DEFAULT_MODEL),  # unknown fields are part of the key
        ({**body, "model": OTHER}, KEY_1, OTHER),  # the same weights served under another name
    ]
    for variant, key, model in variants:
        before = settled(http)
        response = post(http, CHAT_ENDPOINT, variant, key=key)
        assert response.headers["x-inferd-cache"] == "miss", variant
        assert_engine_ran(http, before, model)
    # The second key has its own entry now, and the first key's entry is still there.
    assert post(http, CHAT_ENDPOINT, body, key=KEY_2).headers["x-inferd-cache"] == "hit"
    assert post(http, CHAT_ENDPOINT, body, key=KEY_1).headers["x-inferd-cache"] == "hit"


def test_non_deterministic_requests_are_never_cached(http: httpx.Client) -> None:
    for body in ({"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0.8},
                 {"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": 6}):  # default temperature 1
        for _ in range(2):
            before = settled(http)
            response = post(http, "/v1/completions", body)
            assert "x-inferd-cache" not in response.headers
            after = assert_engine_ran(http, before)
            assert cache_counts(after, DEFAULT_MODEL, "/v1/completions") == cache_counts(before, DEFAULT_MODEL,
                                                                                         "/v1/completions")


def test_cache_false_bypasses_and_bad_value_is_400(http: httpx.Client) -> None:
    body = {"model": DEFAULT_MODEL, "prompt": "Rivers flow", "max_tokens": 6, "temperature": 0}
    for _ in range(2):  # neither read nor written
        before = settled(http)
        response = post(http, "/v1/completions", {**body, "cache": False})
        assert "x-inferd-cache" not in response.headers
        assert_engine_ran(http, before)
    assert post(http, "/v1/completions", body).headers["x-inferd-cache"] == "miss"
    assert post(http, "/v1/completions", {**body, "cache": True}).headers["x-inferd-cache"] == "hit"
    before = settled(http)
    assert "x-inferd-cache" not in post(http, "/v1/completions", {**body, "cache": False}).headers
    assert_engine_ran(http, before)
    for path, bad in (("/v1/completions", {**body, "cache": "no"}),
                      (CHAT_ENDPOINT, {"model": DEFAULT_MODEL, "messages": CHAT, "cache": 0}),
                      ("/v1/embeddings", {"model": EMBED_MODEL, "input": "x", "cache": "false"})):
        response = http.post(path, json=bad)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "cache"


def test_only_complete_answers_are_stored(server: InferdServer, http: httpx.Client) -> None:
    """A stream the client leaves after its first chunk stores nothing: the same request later is a miss."""
    body = {"model": DEFAULT_MODEL, "prompt": "one two three four", "max_tokens": 48, "temperature": 0,
            "stream": True, "ignore_eos": True, "speculative": False}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["x-inferd-cache"] == "miss"
        next(response.iter_lines())
    before = settled(http)
    response = post(http, "/v1/completions", body)
    assert response.headers["x-inferd-cache"] == "miss"
    assert_engine_ran(http, before)


# ---------------------------------------------------------------------------------------------- eviction


def test_eviction_by_bytes(http: httpx.Client) -> None:
    """Two ~11 KB streams overflow the 16 KiB cache: everything older goes, least recently used first."""
    small = {"model": DEFAULT_MODEL, "prompt": "Small answer:", "max_tokens": 4, "temperature": 0}
    post(http, "/v1/completions", small)
    assert post(http, "/v1/completions", small).headers["x-inferd-cache"] == "hit"
    big = [{"model": DEFAULT_MODEL, "prompt": f"Count: {i}", "max_tokens": 48, "temperature": 0, "stream": True,
            "ignore_eos": True, "speculative": False, "logprobs": 1} for i in range(2)]
    sizes = []
    for body in big:
        before = scrape(http)
        post(http, "/v1/completions", body)
        after = scrape(http)
        sizes.append(cache_bytes(after))
        assert cache_bytes(after) <= CAPACITY_BYTES
    assert sizes[1] > CAPACITY_BYTES / 2  # one big entry is more than half the cache ...
    before = settled(http)
    assert post(http, "/v1/completions", small).headers["x-inferd-cache"] == "miss"  # ... so the small one went
    assert_engine_ran(http, before)
    assert post(http, "/v1/completions", big[1]).headers["x-inferd-cache"] == "hit"  # the newest stays


# ---------------------------------------------------------------------------------------------- embeddings


def test_embeddings_per_text_cache(http: httpx.Client) -> None:
    texts = ["a red fox", "a blue whale", "a green frog"]
    post(http, "/v1/embeddings", {"model": EMBED_MODEL, "input": [texts[0], texts[2]]})
    before = scrape(http)
    batch_items = "inferd:batch_size_sum"
    labels = {"model_name": EMBED_MODEL, "kind": "embed"}
    response = post(http, "/v1/embeddings", {"model": EMBED_MODEL, "input": texts})
    after = scrape(http)
    assert response.headers["x-inferd-cache"] == "partial"
    assert metric(after, batch_items, **labels) - metric(before, batch_items, **labels) == 1  # only the new text ran
    assert (np.subtract(cache_counts(after, EMBED_MODEL, "/v1/embeddings"),
                        cache_counts(before, EMBED_MODEL, "/v1/embeddings")) == [2, 1]).all()
    fresh = post(http, "/v1/embeddings", {"model": EMBED_MODEL, "input": texts, "cache": False})
    assert "x-inferd-cache" not in fresh.headers
    cached_vectors = np.array([d["embedding"] for d in response.json()["data"]])
    fresh_vectors = np.array([d["embedding"] for d in fresh.json()["data"]])
    np.testing.assert_allclose(cached_vectors, fresh_vectors, rtol=0, atol=1e-6)

    # dimensions and base64 are applied to the cached full vectors as to fresh ones
    options = {"model": EMBED_MODEL, "input": texts, "dimensions": 32, "encoding_format": "base64"}
    hit = post(http, "/v1/embeddings", options)
    assert hit.headers["x-inferd-cache"] == "hit"
    fresh = post(http, "/v1/embeddings", {**options, "cache": False})
    decode = lambda r: np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]])
    np.testing.assert_allclose(decode(hit), decode(fresh), rtol=0, atol=1e-6)
    assert decode(hit).shape == (3, 32)
    # another key computes its own
    assert post(http, "/v1/embeddings", {"model": EMBED_MODEL, "input": texts}, key=KEY_2).headers[
        "x-inferd-cache"] == "miss"


# ---------------------------------------------------------------------------------------------- in-process


def test_lru_by_bytes_exact() -> None:
    from inferd.server.response_cache import _ENTRY_OVERHEAD_BYTES, ResponseCache

    vector = np.zeros(25, np.float32)  # 100 bytes of data
    keys = [bytes([i]) * 32 for i in range(5)]
    entry_bytes = sys.getsizeof(vector) + sys.getsizeof(keys[0]) + _ENTRY_OVERHEAD_BYTES
    assert entry_bytes >= 100 + 32 + _ENTRY_OVERHEAD_BYTES
    cache = ResponseCache(3 * entry_bytes)
    for key in keys[:3]:
        assert cache.put(key, "m", vector)
    assert cache.num_bytes == 3 * entry_bytes
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used: 1 goes first
    cache.put(keys[3], "m", vector)
    assert [k for k in keys if cache.get(k) is not None] == [keys[0], keys[2], keys[3]]
    assert not cache.put(keys[4], "m", np.zeros(1000, np.float32))  # larger than the whole cache
    assert cache.num_bytes == 3 * entry_bytes and len(cache) == 3
    assert not ResponseCache(0).is_enabled


def test_canonical_body_and_model_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferd.server import response_cache

    canonical = response_cache._canonical_body
    assert canonical(b'{"b": 1, "a": [1, 2], "user": "u", "cache": true, "model": "x"}') == b'{"a":[1,2],"b":1}'
    assert canonical(b'{"a":[1,2],"b":1}') == canonical(b'{ "b":1,"a":[1,2]}')
    assert canonical(b'{"a":1,"tools":[]}') != canonical(b'{"a":1}')

    monkeypatch.setattr(response_cache, "_HASHED_FILE_MAX_BYTES", 8)
    (tmp_path / "config.json").write_text('{"x": 1}')
    (tmp_path / "weights.bin").write_bytes(b"0123456789abcdef")  # over 8 bytes: by size, mtime, inode
    first = response_cache.model_fingerprint(tmp_path)
    assert response_cache.model_fingerprint(tmp_path) == first
    (tmp_path / "config.json").write_text('{"x": 2}')
    second = response_cache.model_fingerprint(tmp_path)
    assert second != first
    stat = (tmp_path / "weights.bin").stat()
    (tmp_path / "weights.bin").write_bytes(b"fedcba9876543210")
    os.utime(tmp_path / "weights.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert response_cache.model_fingerprint(tmp_path) != second

    spec = SimpleNamespace(name="m", source=str(tmp_path), content_digest="abc")
    identity = response_cache.model_identity(SimpleNamespace(spec=spec, engine=object()))
    other_digest = SimpleNamespace(name="m", source=str(tmp_path), content_digest="abd")
    assert response_cache.model_identity(SimpleNamespace(spec=other_digest, engine=object())) != identity
