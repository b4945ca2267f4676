"""KV-cache bookkeeping: block ids, ref counts, prefix hits, eviction order, integrity (exact expectations)."""

from __future__ import annotations

import random

import pytest

from inferd.kv_cache import hashing
from inferd.kv_cache.manager import KVCacheManager
from inferd.request import Request, SamplingParams


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=64))


def compute(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    """What a step does to the books: allocate, then (after the runner wrote K/V) advance and cache."""
    assert kv.allocate_slots(request, num_tokens)
    request.num_computed_tokens += num_tokens
    kv.cache_full_blocks(request)


def admit(kv: KVCacheManager, request: Request) -> tuple[list[int], int]:
    """Prefix lookup + allocation for the rest of the tokens, as the scheduler does for a waiting request."""
    hit_ids, num_hit_tokens = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit_tokens, hit_ids)
    request.num_computed_tokens = num_hit_tokens
    return hit_ids, num_hit_tokens


def ref_cnts(kv: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in kv.block_pool.blocks]


def free_queue_ids(kv: KVCacheManager) -> list[int]:
    return [b.block_id for b in kv.block_pool.free_block_queue]


def test_blocks_handed_out_in_id_order_and_grow_by_block():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))
    assert kv.allocate_slots(a, 10)
    assert kv.get_block_ids("a") == [0, 1, 2]
    b = make_request("b", list(range(100, 105)))
    assert kv.allocate_slots(b, 5)
    assert kv.get_block_ids("b") == [3, 4]
    assert ref_cnts(kv) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert kv.num_free_blocks == 3
    assert kv.usage == pytest.approx(5 / 8)
    # 10 computed + 2 new = 12 tokens still fit 3 blocks; 13 needs a 4th.
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2)
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.allocate_slots(a, 3)
    assert kv.get_block_ids("a") == [0, 1, 2, 5]
    kv.check_integrity()


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 12)
    b = make_request("b", list(range(8)))
    assert not kv.allocate_slots(b, 8)
    assert kv.get_block_ids("b") == []
    assert kv.num_free_blocks == 1
    kv.check_integrity()


def test_free_returns_every_block_and_is_idempotent():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    compute(kv, a, 9)
    kv.free(a)
    assert kv.num_free_blocks == 6 and kv.usage == 0.0
    assert kv.get_block_ids("a") == []
    kv.free(a)
    assert kv.num_free_blocks == 6
    assert ref_cnts(kv) == [0] * 6
    kv.check_integrity()


def test_same_prefix_shares_blocks_and_different_prefix_misses():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))
    compute(kv, a, 10)  # blocks 0, 1 full and cached; block 2 holds 2 tokens, not cached
    assert [b.is_cached for b in kv.block_pool.blocks[:3]] == [True, True, False]

    b = make_request("b", list(range(8)) + [50, 51, 52])
    assert admit(kv, b) == ([0, 1], 8)
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert ref_cnts(kv)[:4] == [2, 2, 1, 1]

    first_token_differs = make_request("c", [99] + list(range(1, 10)))
    assert kv.get_computed_blocks(first_token_differs) == ([], 0)
    second_block_differs = make_request("d", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9])
    assert kv.get_computed_blocks(second_block_differs) == ([0], 4)
    kv.check_integrity()

    kv.free(a)
    assert ref_cnts(kv)[:4] == [1, 1, 0, 1]
    kv.check_integrity()


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(10)))
    compute(kv, a, 10)
    assert kv.get_computed_blocks(make_request("b", list(range(10)))) == ([], 0)
    assert not any(b.is_cached for b in kv.block_pool.blocks)


def test_full_prefix_hit_leaves_at_least_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(12)))
    compute(kv, a, 12)  # three full cached blocks
    assert kv.get_computed_blocks(make_request("same", list(range(12)))) == ([0, 1], 8)
    assert kv.get_computed_blocks(make_request("one_more", list(range(13)))) == ([0, 1, 2], 12)
    assert kv.get_computed_blocks(make_request("one_less", list(range(11)))) == ([0, 1], 8)
    assert kv.get_computed_blocks(make_request("short", list(range(4)))) == ([], 0)


def test_forced_hash_collision_is_a_miss(monkeypatch):
    # Every block gets the same hash: only the stored parent hash and token ids tell blocks apart.
    monkeypatch.setattr(hashing, "hash_block_tokens", lambda parent, token_ids: b"same")
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, a, 9)
    # Block 1 collides with block 0's hash, so it stays uncached rather than replacing it.
    assert [b.is_cached for b in kv.block_pool.blocks[:3]] == [True, False, False]

    other_tokens = make_request("b", [5, 6, 7, 8, 1, 2, 3, 4, 0])
    assert kv.get_computed_blocks(other_tokens) == ([], 0)
    same_first_block = make_request("c", [1, 2, 3, 4, 9, 9, 9, 9, 0])
    assert kv.get_computed_blocks(same_first_block) == ([0], 4)  # block 1's lookup finds block 0: parent differs
    assert kv.get_computed_blocks(make_request("d", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == ([0], 4)
    kv.check_integrity()


def test_hash_is_chained_and_stable():
    h0 = hashing.hash_block_tokens(hashing.ROOT_BLOCK_HASH, [1, 2, 3, 4])
    assert h0 == hashing.hash_block_tokens(hashing.ROOT_BLOCK_HASH, (1, 2, 3, 4))
    assert len(h0) == 32
    root = hashing.ROOT_BLOCK_HASH
    assert hashing.hash_block_tokens(h0, [5, 6, 7, 8]) != hashing.hash_block_tokens(root, [5, 6, 7, 8])
    # sha256 of (empty parent || four little-endian int64): fixed across processes and machines.
    import hashlib
    import struct

    assert h0 == hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()


def test_unreferenced_cached_blocks_are_evicted_lru_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [10, 11, 12, 13])
    b = make_request("b", [20, 21, 22, 23])
    compute(kv, a, 4)
    compute(kv, b, 4)
    assert kv.get_block_ids("a") == [0, 1] and kv.get_block_ids("b") == [2, 3]
    kv.free(a)
    kv.free(b)
    # Never-used blocks first, then a's blocks tail first, then b's: the head is evicted first.
    assert free_queue_ids(kv) == [4, 5, 1, 0, 3, 2]
    assert kv.num_free_blocks == 6  # cached but unreferenced blocks count as free

    c = make_request("c", [30, 31, 32, 33, 34, 35])
    compute(kv, c, 6)
    assert kv.get_block_ids("c") == [4, 5, 1]  # evicts a's tail block, keeps a's first block cached
    assert kv.get_computed_blocks(make_request("a2", [10, 11, 12, 13, 14])) == ([0], 2)
    # A hit on an unreferenced cached block takes it out of the free queue, wherever it stood.
    b2 = make_request("b2", [20, 21, 22, 23, 24])
    assert admit(kv, b2) == ([2, 3], 4)
    assert kv.get_block_ids("b2") == [2, 3, 0]  # its new block evicts a's first block, now the LRU one
    assert free_queue_ids(kv) == []
    kv.check_integrity()
    assert kv.get_computed_blocks(make_request("a3", [10, 11, 12, 13, 14])) == ([], 0)


def test_freed_again_moves_to_tail():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3])
    b = make_request("b", [7, 8, 9])
    compute(kv, a, 3)  # blocks 0, 1
    compute(kv, b, 3)  # blocks 2, 3
    kv.free(a)
    kv.free(b)
    assert free_queue_ids(kv) == [1, 0, 3, 2]
    a_again = make_request("a_again", [1, 2, 3])
    assert admit(kv, a_again) == ([0], 2)  # block 0 leaves the queue; one new block: 1 (the head)
    assert kv.get_block_ids("a_again") == [0, 1]
    kv.free(a_again)
    assert free_queue_ids(kv) == [3, 2, 1, 0]  # a's blocks are now the most recently used
    kv.check_integrity()


def test_allocation_counts_unreferenced_hits_against_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)  # blocks 0, 1 cached, block 2 partial
    kv.free(a)
    again = make_request("again", [1, 2, 3, 4, 5, 6, 7, 8])
    hit_ids, num_hit_tokens = kv.get_computed_blocks(again)
    assert (hit_ids, num_hit_tokens) == ([0, 1], 4)
    # 8 tokens = 4 blocks: 2 hits + 2 new, but the hits use 2 of the 3 free blocks.
    assert not kv.allocate_slots(again, 4, hit_ids)
    assert ref_cnts(kv) == [0, 0, 0]
    assert kv.allocate_slots(again, 2, hit_ids)
    assert kv.get_block_ids("again") == [0, 1, 2]
    kv.check_integrity()


def test_reset_prefix_cache_forgets_hashes():
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    assert kv.reset_prefix_cache() == 2
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5])) == ([], 0)
    kv.check_integrity()
    # Caching continues for what a computes from now on.
    a.append_output_token(6)
    compute(kv, a, 1)
    assert kv.get_computed_blocks(make_request("c", [1, 2, 3, 4, 5, 6, 0])) == ([], 0)  # block 0 forgotten
    assert [b.is_cached for b in kv.block_pool.blocks[:3]] == [False, False, True]


def test_free_slots_past_drops_look_ahead_blocks_tail_first():
    """Rejected proposals: the blocks past the kept tokens go back to the free queue's tail, last block first,
    uncached; the blocks of computed tokens stay cached and shared."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(6)))
    compute(kv, a, 5)  # 5 of 6 computed: block 0 full and cached
    assert kv.allocate_slots(a, 1 + 6)  # the last known token + 6 proposals: positions 5..11
    assert kv.get_block_ids("a") == [0, 1, 2]
    a.num_computed_tokens += 1 + 1  # one proposal accepted ...
    a.append_output_token(100)  # ... which joins the tokens,
    a.append_output_token(101)  # and one more token comes after it: 8 tokens, 7 computed
    kv.cache_full_blocks(a)
    assert kv.free_slots_past(a, a.num_tokens) == 1  # block 2 held only rejected slots
    assert kv.get_block_ids("a") == [0, 1]
    assert free_queue_ids(kv)[-1] == 2 and not kv.block_pool.blocks[2].is_cached
    assert kv.block_pool.blocks[0].is_cached and not kv.block_pool.blocks[1].is_cached
    assert kv.free_slots_past(a, a.num_tokens) == 0
    kv.check_integrity()
    with pytest.raises(ValueError, match="prefix cache"):
        kv.free_slots_past(a, 0)  # block 0 is registered: refusing keeps the books right


def test_check_integrity_catches_corruption():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3])
    compute(kv, a, 3)
    kv.check_integrity()
    kv.block_pool.blocks[0].ref_cnt += 1
    with pytest.raises(AssertionError):
        kv.check_integrity()
    kv.block_pool.blocks[0].ref_cnt -= 1
    kv.req_to_blocks["a"].append(kv.block_pool.blocks[3])  # a table entry without a reference
    with pytest.raises(AssertionError):
        kv.check_integrity()
    kv.req_to_blocks["a"].pop()
    kv.block_pool.cached_blocks.pop(kv.block_pool.blocks[0].block_hash)
    with pytest.raises(AssertionError):
        kv.check_integrity()


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_randomized_workload_keeps_books_and_kv_contents_right(enable_prefix_caching):
    """Random admissions, chunks, decodes and frees on a small pool. A shadow KV store records, per slot, the
    prefix whose K/V was written there; every read of a computed position must find its own prefix."""
    rng = random.Random(1234)
    block_size = 4
    num_blocks = 24
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    slot_prefix: dict[int, tuple[int, ...]] = {}  # slot = block_id * block_size + offset
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(2, 14))] for _ in range(4)]
    live: list[Request] = []
    num_hit_tokens_total = 0

    def check_reads(request: Request) -> None:
        block_ids = kv.get_block_ids(request.request_id)
        for pos in range(request.num_computed_tokens):
            slot = block_ids[pos // block_size] * block_size + pos % block_size
            assert slot_prefix[slot] == tuple(request.all_token_ids[: pos + 1]), (request, pos)

    for step in range(600):
        op = rng.random()
        if op < 0.25 and len(live) < 8:
            tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(1, 10))]
            request = make_request(f"r{step}", tokens)
            hit_ids, num_hit = kv.get_computed_blocks(request)
            num_new = rng.randrange(1, request.num_tokens - num_hit + 1)
            if kv.allocate_slots(request, num_new, hit_ids):
                request.num_computed_tokens = num_hit
                num_hit_tokens_total += num_hit
                check_reads(request)
                live.append(request)
                pending = num_new
            else:
                assert kv.get_block_ids(request.request_id) == []
                kv.free(request)
                kv.check_integrity()
                continue
        elif op < 0.4 and live:
            request = live.pop(rng.randrange(len(live)))
            kv.free(request)
            kv.check_integrity()
            continue
        elif live:
            request = rng.choice(live)
            if request.num_computed_tokens == request.num_tokens:
                request.append_output_token(rng.randrange(5))
            pending = rng.randrange(1, request.num_tokens - request.num_computed_tokens + 1)
            if not kv.allocate_slots(request, pending):
                kv.check_integrity()
                continue
        else:
            continue
        # The "runner": read the computed prefix, write K/V for the new positions, then the books advance.
        check_reads(request)
        block_ids = kv.get_block_ids(request.request_id)
        for pos in range(request.num_computed_tokens, request.num_computed_tokens + pending):
            slot = block_ids[pos // block_size] * block_size + pos % block_size
            slot_prefix[slot] = tuple(request.all_token_ids[: pos + 1])
        request.num_computed_tokens += pending
        kv.cache_full_blocks(request)
        kv.check_integrity()
        assert len(block_ids) == -(-request.num_computed_tokens // block_size)

    for request in live:
        kv.free(request)
    kv.check_integrity()
    assert kv.num_free_blocks == num_blocks
    assert (num_hit_tokens_total > 0) == enable_prefix_caching
