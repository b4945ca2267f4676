"""An idle server gives freed heap memory back to the OS (issue 9, footprint).

The serving loop calls glibc's malloc_trim once it has been idle for IDLE_HEAP_TRIM_DELAY_S after a busy spell.
Checked here: the call really returns freed heap pages (RSS measured from /proc around a fragmented heap), the
loop trims once per idle spell and never while requests keep it busy, and outputs after a trim equal the ones
before it.
"""

from __future__ import annotations

import asyncio
import ctypes
import platform
import time

import inferd.engine.async_engine as async_engine_module
from inferd.device import release_free_heap_memory
from inferd.engine.async_engine import AsyncEngine
from inferd.engine.llm import LLM
from inferd.request import SamplingParams

MIB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_release_returns_freed_heap_pages_to_the_os() -> None:
    if platform.libc_ver()[0] != "glibc":
        # malloc_trim is glibc's: elsewhere the call is documented to do nothing and say so.
        assert release_free_heap_memory() is False
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    chunk_bytes = 64 * 1024  # under glibc's initial mmap threshold: these live on the heap
    chunks = []
    for _ in range(3000):
        pointer = libc.malloc(chunk_bytes)
        libc.memset(pointer, 1, chunk_bytes)  # touch every page
        chunks.append(pointer)
    # Free every other chunk: the holes sit between live chunks, so free() alone cannot shrink the heap's top.
    for pointer in chunks[::2]:
        libc.free(pointer)
    before = rss_bytes()
    assert release_free_heap_memory() is True
    after = rss_bytes()
    for pointer in chunks[1::2]:
        libc.free(pointer)
    freed_in_holes = 1500 * chunk_bytes  # ~94 MiB
    assert before - after >= freed_in_holes // 2, (before / MIB, after / MIB)


def test_the_serving_loop_trims_once_per_idle_spell(default_gguf_path, monkeypatch) -> None:
    monkeypatch.setattr(async_engine_module, "IDLE_HEAP_TRIM_DELAY_S", 1.0)
    llm = LLM(model=str(default_gguf_path), kv_cache_memory="64MiB", max_model_len=256, speculative="off")
    prompt = llm.tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = llm.generate([prompt], params)[0].outputs[0].token_ids

    async def run() -> tuple[list[list[int]], list[int]]:
        engine = AsyncEngine(llm.engine)
        engine.start()
        tokens, releases = [], [engine.num_heap_releases]
        try:
            for spell in range(2):
                # Back-to-back requests: no idle spell between them, so no trim.
                for i in range(3):
                    last = None
                    async for output in engine.generate(prompt, params, request_id=f"s{spell}-r{i}"):
                        last = output
                    tokens.append(last.outputs[0].token_ids)
                releases.append(engine.num_heap_releases)
                deadline = time.monotonic() + 30
                while engine.num_heap_releases == releases[-1] and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(2.5)  # idle on: still one trim for this spell
                releases.append(engine.num_heap_releases)
        finally:
            engine.shutdown()
        return tokens, releases

    tokens, releases = asyncio.run(run())
    assert tokens == [reference] * 6
    # Start 0; after the first busy spell at most 0 (3 requests ran back to back); one trim once idle; the second
    # spell adds none while busy and one once idle.
    assert releases[0] == 0 and releases[2] == 1 and releases[4] == 2, releases
    assert releases[1] == 0 and releases[3] == 1, releases
