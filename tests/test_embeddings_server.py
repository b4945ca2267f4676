"""/v1/embeddings as users meet it: the official `openai` client against a real `inferd serve` subprocess that
serves the default LLM and the default embedding model together; vectors compared with sentence-transformers."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from server_fixtures import DEFAULT_MODEL, InferdServer, start_inferd_server, stop_inferd_server

import sentence_transformers as st  # the reference (test extra)

EMBED_MODEL = "all-minilm-l6-v2"
TEXTS = ["The cat sat on the mat.", "Ünïcödé and emoji 🎉 work too", "def f(x):\n    return x * 2", "a"]


@pytest.fixture(scope="module")
def server(inferd_home: Path, embedding_model_dir: Path, default_gguf_path: Path):
    server = start_inferd_server(model=[DEFAULT_MODEL, EMBED_MODEL])
    try:
        yield server
    finally:
        stop_inferd_server(server.process)


@pytest.fixture(scope="module")
def client(server: InferdServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def st_model(embedding_model_dir: Path):
    return st.SentenceTransformer(str(embedding_model_dir), device="cpu")


def _vectors(response) -> np.ndarray:
    """The response's vectors; asked-for base64 comes back as the string (the client decodes only its own default)."""
    assert [d.index for d in response.data] == list(range(len(response.data)))
    rows = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if isinstance(d.embedding, str) else d.embedding
        for d in response.data
    ]
    return np.array(rows, dtype=np.float32)


def _assert_close_to_reference(ours: np.ndarray, ref: np.ndarray) -> None:
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.9999, cosine


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_every_input_form_matches_sentence_transformers(client, st_model, encoding_format: str) -> None:
    ref = st_model.encode(TEXTS, convert_to_numpy=True)
    token_id_lists = [st_model.tokenizer(t)["input_ids"] for t in TEXTS]

    one = client.embeddings.create(model=EMBED_MODEL, input=TEXTS[0], encoding_format=encoding_format)
    if encoding_format == "base64":
        assert isinstance(one.data[0].embedding, str)
    _assert_close_to_reference(_vectors(one), ref[:1])
    assert one.model == EMBED_MODEL
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(token_id_lists[0])

    many = client.embeddings.create(model=EMBED_MODEL, input=TEXTS, encoding_format=encoding_format)
    _assert_close_to_reference(_vectors(many), ref)
    assert many.usage.prompt_tokens == sum(len(ids) for ids in token_id_lists)

    ids_one = client.embeddings.create(model=EMBED_MODEL, input=token_id_lists[1], encoding_format=encoding_format)
    _assert_close_to_reference(_vectors(ids_one), ref[1:2])

    ids_many = client.embeddings.create(model=EMBED_MODEL, input=token_id_lists, encoding_format=encoding_format)
    _assert_close_to_reference(_vectors(ids_many), ref)
    # token ids and the same text give the same vector, bitwise
    assert np.array_equal(_vectors(ids_many), _vectors(many))


def test_dimensions_and_truncate(client, st_model) -> None:
    ref = st_model.encode(TEXTS, convert_to_numpy=True)
    short = _vectors(client.embeddings.create(model=EMBED_MODEL, input=TEXTS, dimensions=128))
    expected = ref[:, :128] / np.linalg.norm(ref[:, :128], axis=1, keepdims=True)
    assert short.shape == (len(TEXTS), 128)
    _assert_close_to_reference(short, expected)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)

    long_text = "word " * 400  # > 256 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED_MODEL, input=["short", long_text])
    assert info.value.body["param"] == "input[1]"
    assert "input[1] has 402 tokens, more than the model's limit of 256" in info.value.body["message"]
    cut = client.embeddings.create(model=EMBED_MODEL, input=["short", long_text], extra_body={"truncate": True})
    _assert_close_to_reference(_vectors(cut), st_model.encode(["short", long_text], convert_to_numpy=True))
    assert cut.usage.prompt_tokens == 3 + 256


@pytest.mark.parametrize(
    "body,param,message",
    [
        ({"input": ["ok", ""]}, "input[1]", "empty strings cannot be embedded"),
        ({"input": []}, "input", "input must not be empty"),
        ({"input": [[101, 40000, 102]]}, "input[0][1]", "token id 40000 is outside the vocabulary [0, 30522)"),
        ({"input": ["x"] * 2049}, "input", "more than the limit of 2048 per request"),
        ({"input": "x", "dimensions": 385}, "dimensions", "dimensions must be <= 384"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", ""),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server: InferdServer, body: dict, param: str, message: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/embeddings", json={"model": EMBED_MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_chat_beside_embeddings_and_kind_errors(client) -> None:
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="generate"):
        client.embeddings.create(model=DEFAULT_MODEL, input="x")
    with pytest.raises(openai.BadRequestError, match="embed"):
        client.chat.completions.create(model=EMBED_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError, match=EMBED_MODEL):
        client.embeddings.create(model="no-such-model", input="x")
    models = {m.id for m in client.models.list().data}
    assert {DEFAULT_MODEL, EMBED_MODEL} <= models


def test_concurrent_requests_get_the_vectors_they_get_alone(server: InferdServer, client) -> None:
    """Many single-text requests at once share micro-batches; each vector is bitwise its alone value."""
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the stock market'}" for i in range(24)]
    alone = [_vectors(client.embeddings.create(model=EMBED_MODEL, input=t, encoding_format="float"))[0] for t in texts]

    async def run() -> list[np.ndarray]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        responses = await asyncio.gather(
            *(aclient.embeddings.create(model=EMBED_MODEL, input=t, encoding_format="float") for t in texts)
        )
        await aclient.close()
        return [_vectors(r)[0] for r in responses]

    together = asyncio.run(run())
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_full_queue_is_a_429_with_retry_after(inferd_home: Path, embedding_model_dir: Path, tmp_path: Path) -> None:
    """A models file gives the embedding model max_queue 2: a request of 3 inputs cannot be queued (a request's
    inputs are queued all or none), so it gets 429 + Retry-After, and the server goes on serving."""
    models_file = tmp_path / "models.yaml"
    models_file.write_text(f"models:\n  - name: small-queue\n    source: {EMBED_MODEL}\n    options: {{max_queue: 2}}\n")
    # (server_fixtures needs one --model: a second copy under another name)
    server = start_inferd_server(["--models-file", str(models_file)], model=[f"plain={EMBED_MODEL}"])
    try:
        url = f"{server.base_url}/v1/embeddings"
        r = httpx.post(url, json={"model": "small-queue", "input": ["a", "b", "c"]}, timeout=60)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert "max_queue_items 2" in r.json()["error"]["message"]
        ok = httpx.post(url, json={"model": "small-queue", "input": ["a", "b"]}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    finally:
        stop_inferd_server(server.process)
