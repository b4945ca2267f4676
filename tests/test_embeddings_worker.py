"""The embedding worker process (`worker: process`, the default on CPU; inferd/embeddings/worker.py): the same
vectors as computing in the server process and as sentence-transformers, its priority, and what happens when it
dies: the batch in flight fails with a clear 503, nothing hangs, and the next request is served by a new worker.
Real model (all-MiniLM-L6-v2 from the test store), real processes, no mocks."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_fixtures import start_inferd_server, stop_inferd_server
from test_embeddings import varied_texts

from inferd.embeddings import AsyncEmbedEngine, EmbedOptions
from inferd.embeddings.worker import EmbedWorkerDiedError, decode_request, encode_request

import sentence_transformers as st  # the reference (test extra)

EMBED_MODEL = "all-minilm-l6-v2"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_request_encoding_round_trips() -> None:
    lists = [[101, 7592, 102], [101], [101, 2, 3, 4, 102]]
    assert decode_request(encode_request(lists)) == lists


def test_options_name_the_worker_and_its_niceness() -> None:
    assert EmbedOptions().worker == "process" and EmbedOptions().worker_nice == 5
    assert EmbedOptions.from_mapping({"worker": "thread", "worker_nice": "0"}) == EmbedOptions(worker="thread", worker_nice=0)
    with pytest.raises(ValueError, match="option worker must be 'process' or 'thread', got 'fork'"):
        EmbedOptions.from_mapping({"worker": "fork"})
    with pytest.raises(ValueError, match=r"option worker_nice must be in \[0, 19\], got 20"):
        EmbedOptions.from_mapping({"worker_nice": 20})


def test_worker_process_vectors_equal_in_process_and_match_sentence_transformers(embedding_model_dir: Path) -> None:
    """The same inputs, many requests at once, through a worker process and through in-process worker threads:
    bitwise the same vectors, each within cosine 0.9999 of sentence-transformers. The worker is another process,
    at the server's niceness + worker_nice."""
    texts = varied_texts(num_random=60, seed=5)
    in_worker = AsyncEmbedEngine.from_path(embedding_model_dir, {"num_threads": 2, "worker_nice": 3})
    in_process = AsyncEmbedEngine.from_path(embedding_model_dir, {"num_threads": 2, "worker": "thread"})
    assert in_process._worker is None and in_worker._worker is not None
    worker_pid = in_worker._worker.pid
    assert worker_pid is not None and worker_pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, worker_pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    token_id_lists = in_worker.tokenizer.encode_batch(texts, truncate=True)

    async def run(engine: AsyncEmbedEngine) -> np.ndarray:
        engine.start()
        try:  # one request per text and one request with all of them, at once: shared batches
            results = await asyncio.gather(*(engine.embed([ids]) for ids in token_id_lists), engine.embed(token_id_lists))
        finally:
            engine.shutdown()
        assert np.array_equal(np.concatenate(results[:-1]), results[-1])
        return results[-1]

    ours = asyncio.run(run(in_worker))
    assert np.array_equal(ours, asyncio.run(run(in_process)))
    ref = st.SentenceTransformer(str(embedding_model_dir), device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    assert _cosines(ours, ref).min() >= 0.9999
    assert not os.path.exists(f"/proc/{worker_pid}")  # shutdown ended (and reaped) the worker process


def test_a_worker_that_died_while_idle_is_replaced_before_the_next_batch(embedding_model_dir: Path) -> None:
    engine = AsyncEmbedEngine.from_path(embedding_model_dir, {"num_threads": 1})
    ids = engine.tokenizer.encode_batch(["a ship at sea", "a train"], truncate=True)

    async def run() -> tuple[np.ndarray, np.ndarray]:
        engine.start()
        try:
            before = await engine.embed(ids)
            first_pid = engine._worker.pid
            os.kill(first_pid, signal.SIGKILL)
            engine._worker._child.process.wait(10)  # dead before the next batch
            after = await engine.embed(ids)
            assert engine._worker.pid != first_pid and engine._worker.num_restarts == 1
            return before, after
        finally:
            engine.shutdown()

    before, after = asyncio.run(run())
    assert np.array_equal(before, after)


def test_the_batch_in_flight_fails_with_worker_died_and_the_next_is_served(embedding_model_dir: Path) -> None:
    """SIGKILL the worker while it computes a big batch: that request fails with EmbedWorkerDiedError (not retried
    item by item), the next request is served by a new worker with the same vectors."""
    engine = AsyncEmbedEngine.from_path(embedding_model_dir, {"num_threads": 1})
    long_ids = engine.tokenizer.encode_batch(["word " * 300] * 32, truncate=True)  # 32 x 256 tokens: one batch, seconds
    short_ids = engine.tokenizer.encode_batch(["a ship at sea"], truncate=True)

    async def run() -> None:
        engine.start()
        try:
            expected = await engine.embed(short_ids)
            pid = engine._worker.pid
            idle_cpu_s = _cpu_seconds(pid)
            big = asyncio.create_task(engine.embed(long_ids))
            while _cpu_seconds(pid) < idle_cpu_s + 0.05:  # it computes the big batch now
                await asyncio.sleep(0.005)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(EmbedWorkerDiedError, match=rf"pid {pid}\) died while computing this batch"):
                await big
            assert np.array_equal(await engine.embed(short_ids), expected)
        finally:
            engine.shutdown()

    asyncio.run(run())


def test_served_worker_death_is_a_503_and_the_next_request_is_served(embedding_model_dir: Path, st_model_vectors) -> None:
    """Through `inferd serve`: requests in flight when the worker is killed each get 200 or a 503 naming the
    worker (none hangs, none is a bare 500), and the next request gets 200 with sentence-transformers' vectors."""
    server = start_inferd_server(model=[EMBED_MODEL])
    try:
        url = f"{server.base_url}/v1/embeddings"
        texts, ref = st_model_vectors
        assert httpx.post(url, json={"model": EMBED_MODEL, "input": texts}, timeout=120).status_code == 200
        workers = [pid for pid in _children(server.process.pid) if b"inferd.embeddings.worker" in _cmdline(pid)]
        assert len(workers) == 1
        pid = workers[0]
        idle_cpu_s = _cpu_seconds(pid)
        answers: list[httpx.Response] = []

        def post_big() -> None:
            body = {"model": EMBED_MODEL, "input": ["word " * 250] * 32}  # 252 tokens each: within 256
            answers.append(httpx.post(url, json=body, timeout=120))

        senders = [threading.Thread(target=post_big) for _ in range(3)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 60
        while _cpu_seconds(pid) < idle_cpu_s + 0.05 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        for sender in senders:
            sender.join(120)
        assert len(answers) == 3 and any(a.status_code == 503 for a in answers), [a.status_code for a in answers]
        for answer in answers:
            assert answer.status_code in (200, 503), answer.text
            if answer.status_code == 503:
                error = answer.json()["error"]
                assert error["code"] == "worker_died" and f"pid {pid}" in error["message"]
                assert answer.headers["retry-after"] == "1"
        after = httpx.post(url, json={"model": EMBED_MODEL, "input": texts}, timeout=120)
        assert after.status_code == 200, after.text
        vectors = np.array([d["embedding"] for d in after.json()["data"]], dtype=np.float32)
        assert _cosines(vectors, ref).min() >= 0.9999
    finally:
        stop_inferd_server(server.process)


@pytest.fixture(scope="module")
def st_model_vectors(embedding_model_dir: Path) -> tuple[list[str], np.ndarray]:
    texts = ["The cat sat on the mat.", "Ünïcödé and emoji 🎉 work too", "def f(x):\n    return x * 2", "a", "a ship"]
    model = st.SentenceTransformer(str(embedding_model_dir), device="cpu")
    return texts, model.encode(texts, convert_to_numpy=True)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
