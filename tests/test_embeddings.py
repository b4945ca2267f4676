"""Embedding engine (inferd/embeddings) against sentence-transformers on the real default all-MiniLM-L6-v2, and
batch independence through the micro-batcher.

The default model comes through the store (`embedding_model_dir` in conftest.py pulls it once into $INFERD_HOME).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from inferd.batching import QueueFullError
from inferd.embeddings import AsyncEmbedEngine, Embedder, EmbedOptions
from inferd.embeddings.embedder import split_by_budget

import sentence_transformers as st  # the reference (test extra)

_WORDS = (
    "the of and to in is was for on that with as by at from his her an are which this be or had not have model "
    "server embedding vector search similar items recommendation fraud score latency throughput batch token"
).split()
_FIXED_TEXTS = [
    "",
    "a",
    "Hello, world!",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnewlines\r\nmixed",
    "Ünïcödé àccents: café, naïve, façade, Ångström, Straße.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji: 😀 🎉 👍🏽 ❤️ 🇫🇷 and more 😀😀.",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2))\n",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id DESC LIMIT 10;",
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "Numbers: 12345, 3.14159, 2024-01-01, 1,000,000 and 42.",
    "I'm sure you've seen it; they'll say we'd won't can't.",
    "URL https://example.com/a/b?c=d&e=f#g and email someone@example.org",
    "x" * 2000,  # one very long word: many word pieces, truncated
]


def varied_texts(num_random: int = 100, seed: int = 0) -> list[str]:
    """Fixed edge cases plus seeded sentences of 1-400 words (the longest are truncated at 256 tokens)."""
    rng = random.Random(seed)
    texts = list(_FIXED_TEXTS)
    for i in range(num_random):
        num_words = rng.choice([1, 3, 8, 20, 40, 60]) if i % 10 else rng.randrange(250, 400)
        words = [rng.choice(_WORDS) for _ in range(num_words)]
        if i % 7 == 0:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_FIXED_TEXTS[5:12]))
        texts.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ""]))
    return texts


@pytest.fixture(scope="module")
def embedder(embedding_model_dir: Path) -> Embedder:
    return Embedder(embedding_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def st_model(embedding_model_dir: Path):
    return st.SentenceTransformer(str(embedding_model_dir), device="cpu")


def test_real_default_matches_sentence_transformers(embedder: Embedder, st_model) -> None:
    texts = varied_texts()
    assert len(texts) >= 100
    token_counts = [len(ids) for ids in embedder.model.tokenizer.encode_batch(texts)]
    assert max(token_counts) > embedder.max_seq_length  # some inputs are truncated
    assert embedder.max_seq_length == st_model.max_seq_length == 256
    ours = embedder.embed(texts)
    ref = st_model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    assert ours.shape == ref.shape == (len(texts), 384)
    assert ours.dtype == np.float32
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.9999, (cosine.min(), texts[int(cosine.argmin())][:80])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the model's Normalize module
    # same token ids as the reference tokenizer (truncation included)
    st_ids = st_model.tokenize(texts)["input_ids"]
    st_mask = st_model.tokenize(texts)["attention_mask"]
    for i, ids in enumerate(embedder.model.tokenizer.encode_batch(texts, truncate=True)):
        assert ids == st_ids[i][: int(st_mask[i].sum())].tolist()


def test_int8_path_within_0_999_of_sentence_transformers(embedding_model_dir: Path, st_model) -> None:
    """The opt-in int8 encoder: every vector within cosine 0.999 of sentence-transformers' float model, and still the
    same bits alone as inside a batch."""
    int8 = Embedder(embedding_model_dir, device="cpu", dtype="float32", quantization="int8")
    assert type(int8.model.encoder.layers[0].ffn_up).__name__ == "QuantLinear"
    texts = varied_texts()
    ours = int8.embed(texts)
    ref = st_model.encode(texts, batch_size=32, convert_to_numpy=True)
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.999, (cosine.min(), texts[int(cosine.argmin())][:80])
    alone = np.stack([int8.embed([t])[0] for t in texts[:30]])
    assert np.array_equal(alone, ours[:30])
    with pytest.raises(ValueError, match="unknown encoder quantization 'int4'; supported: none, int8"):
        Embedder(embedding_model_dir, device="cpu", quantization="int4")


def test_truncate_false_names_the_text(embedder: Embedder) -> None:
    with pytest.raises(ValueError, match=r"texts\[1\] has \d+ tokens, more than the model's max_seq_length 256"):
        embedder.embed(["short", "word " * 300], truncate=False)


def test_alone_equals_inside_a_busy_batch(embedder: Embedder) -> None:
    """Each text embedded alone == the same text while many concurrent requests share batches, bitwise."""
    texts = varied_texts(num_random=40, seed=1)
    token_id_lists = embedder.model.tokenizer.encode_batch(texts, truncate=True)
    alone = np.stack([embedder.model.embed_token_ids([ids])[0] for ids in token_id_lists])
    engine = AsyncEmbedEngine(embedder.model, EmbedOptions(max_batch_tokens=1024, max_batch_items=16))
    batch_sizes: list[int] = []
    engine._batcher._on_batch = lambda record: batch_sizes.append(record.num_items)

    async def run() -> list[np.ndarray]:
        engine.start()
        try:
            # one request per text, plus two multi-input requests, all at once
            singles = [engine.embed([ids]) for ids in token_id_lists]
            many = [engine.embed(token_id_lists[:20]), engine.embed(token_id_lists[::-1])]
            return await asyncio.gather(*singles, *many)
        finally:
            engine.shutdown()

    results = asyncio.run(run())
    assert max(batch_sizes) > 1  # batches really were shared
    singles = np.concatenate(results[: len(texts)])
    assert np.array_equal(singles, alone)
    assert np.array_equal(results[-2], alone[:20])
    assert np.array_equal(results[-1], alone[::-1])


def test_engine_rejects_bad_inputs_and_full_queue(embedder: Embedder) -> None:
    import torch

    threads_before = torch.get_num_threads()
    engine = AsyncEmbedEngine(embedder.model, EmbedOptions(max_queue=4, num_threads=1))

    async def run() -> None:
        engine.start()
        try:
            with pytest.raises(ValueError, match="input 1: token id 40000 is outside the vocabulary"):
                await engine.embed([[101, 102], [101, 40000, 102]])
            with pytest.raises(ValueError, match="input 0: an input has 300 tokens, more than the model's 256"):
                await engine.embed([[101] * 300])
            with pytest.raises(QueueFullError):
                await engine.embed([[101, 102]] * 5)
            one_thread = await engine.embed([[101, 7592, 2088, 102]])
            np.testing.assert_allclose(one_thread, embedder.model.embed_token_ids([[101, 7592, 2088, 102]]), atol=1e-6)
        finally:
            engine.shutdown()

    asyncio.run(run())
    assert not engine.is_running
    assert torch.get_num_threads() == threads_before  # num_threads held for the worker thread only


def test_workers_compute_within_the_cpu_share(embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two single-threaded workers: both compute at once while no other model is busy, one at a time while
    another model (a stand-in holder of the process's CpuThreadShare) is busy; vectors unchanged either way.
    The share is told the machine has 2 CPUs, so the test means the same on a 1-CPU machine."""
    import threading

    from inferd.device import CPU_THREADS

    monkeypatch.setattr(CPU_THREADS, "num_cpus", 2)

    model = embedder.model
    token_id_lists = model.tokenizer.encode_batch(varied_texts(num_random=30, seed=3), truncate=True)
    expected = np.stack([model.embed_token_ids([ids])[0] for ids in token_id_lists])
    lock = threading.Lock()
    now = {"computing": 0, "max": 0}

    class Observed:  # the real model, with its concurrency counted
        def __getattr__(self, name):
            return getattr(model, name)

        def embed_token_ids(self, items):
            with lock:
                now["computing"] += 1
                now["max"] = max(now["max"], now["computing"])
            try:
                return model.embed_token_ids(items)
            finally:
                with lock:
                    now["computing"] -= 1

    def run_all(other_busy: bool) -> tuple[np.ndarray, int]:
        now["max"] = 0
        engine = AsyncEmbedEngine(Observed(), EmbedOptions(num_threads=2, max_batch_items=2))  # type: ignore[arg-type]
        other = CPU_THREADS.register()

        async def run() -> list[np.ndarray]:
            engine.start()
            try:
                if other_busy:
                    other.mark_busy()
                return await asyncio.gather(*(engine.embed([ids]) for ids in token_id_lists))
            finally:
                other.close()
                engine.shutdown()

        return np.concatenate(asyncio.run(run())), now["max"]

    vectors, max_computing = run_all(other_busy=True)
    assert max_computing == 1 and np.array_equal(vectors, expected)
    vectors, max_computing = run_all(other_busy=False)
    assert max_computing == 2 and np.array_equal(vectors, expected)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match=r"unknown embedding model option\(s\) \['max_batch_size'\]; known: \["):
        EmbedOptions.from_mapping({"max_batch_size": 3})
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        EmbedOptions.from_mapping({"max_batch_tokens": 0})
    assert EmbedOptions.from_mapping({"max_batch_tokens": "512", "max_wait_ms": 2, "num_threads": 1}) == EmbedOptions(
        max_batch_tokens=512, max_wait_ms=2.0, num_threads=1
    )
    with pytest.raises(ValueError, match=r"fill_gap_ms must be in \[0.01, 1000"):
        EmbedOptions.from_mapping({"fill_gap_ms": 0})
    assert EmbedOptions.from_mapping({"fill_wait_ms": "0", "fill_gap_ms": 1}) == EmbedOptions(fill_wait_ms=0.0, fill_gap_ms=1.0)


def test_split_by_budget() -> None:
    assert split_by_budget([3, 3, 3, 10, 1], max_batch_tokens=6, max_batch_items=8) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split_by_budget([1, 1, 1], max_batch_tokens=100, max_batch_items=2) == [(0, 2), (2, 3)]
    assert split_by_budget([], 10, 10) == []


def test_tiny_cls_model_through_embedder(tmp_path: Path) -> None:
    """A non-default layout (sentence-transformers 6 files, CLS pooling, no Normalize) through the text API."""
    from test_bert import make_tiny_sentence_encoder

    st_tiny = make_tiny_sentence_encoder(tmp_path, pooling_mode="cls", normalize=False, max_seq_length=12)
    texts = ["the fox runs", "code def ( ) : the dog runs the fox runs the dog runs", "", "zzz"]
    ours = Embedder(tmp_path / "st", device="cpu").embed(texts)
    ref = st_tiny.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_cli_embed_resolves_the_catalog_name(embedding_model_dir: Path, st_model, capsys) -> None:
    import json

    from inferd.cli import main

    texts = ["the cli embeds this", "and this ü"]
    assert main(["embed", "--model", "all-minilm-l6-v2", *texts]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["index"] for d in out["data"]] == [0, 1] and out["dimension"] == 384
    ours = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    ref = st_model.encode(texts, convert_to_numpy=True)
    assert ((ours * ref).sum(1)).min() >= 0.9999  # both unit length
