"""Layer 1: each request's block table, prefix-cache lookup, and the prefix-cache statistics.

The seam between the scheduler and the block pool. The scheduler asks in tokens; the manager answers in blocks.

Life of a request's blocks:
  get_computed_blocks(req)        waiting request: which leading full blocks are already cached (no side effect)
  allocate_slots(req, k, hit_ids) take references on the hits, add blocks so the table covers
                                  num_computed_tokens + hit tokens + k tokens; all or nothing
  cache_full_blocks(req)          after the step ran: register blocks now full of computed tokens in the cache
  free_slots_past(req, n)         rejected proposals: drop the blocks past the request's first n tokens
  free(req)                       finished, aborted or preempted: drop references, tail block first

A block is cached only after its K/V has been written (cache_full_blocks runs after the step), so a request
never gets a prefix hit on a block that is still being computed in the same step.
"""

from __future__ import annotations

from inferd.kv_cache import hashing
from inferd.kv_cache.block_pool import BlockPool, KVBlock
from inferd.kv_cache.hashing import ROOT_BLOCK_HASH, BlockHash
from inferd.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # Chained hashes of the request's leading full blocks, computed once per request (tokens never change).
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of the request's table went through cache registration (hit or cached or twin).
        self.num_registered_blocks: dict[str, int] = {}
        # Prefix-cache statistics in tokens, counted once per scheduled lookup (see record_prefix_cache_stats).
        self.num_prefix_cache_queries_tokens = 0
        self.num_prefix_cache_hits_tokens = 0

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now; unreferenced cached blocks count (they are evicted on demand)."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, 0..1."""
        return 1.0 - self.block_pool.num_free_blocks / self.num_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of `request.all_token_ids`, in whole blocks: (block ids, number of tokens).

        Capped at the largest multiple of block_size strictly below num_tokens, so at least one token is left
        to compute and the step has logits to sample from. Changes nothing: `allocate_slots` takes the references.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_num_hit_blocks = (request.num_tokens - 1) // self.block_size
        block_hashes = self._block_hashes(request, max_num_hit_blocks)
        hit_block_ids: list[int] = []
        parent_hash = ROOT_BLOCK_HASH
        tokens = request.all_token_ids
        for i, block_hash in enumerate(block_hashes[:max_num_hit_blocks]):
            token_ids = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.block_pool.get_cached_block(block_hash, parent_hash, token_ids)
            if block is None:
                break
            hit_block_ids.append(block.block_id)
            parent_hash = block_hash
        return hit_block_ids, len(hit_block_ids) * self.block_size

    def record_prefix_cache_stats(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one lookup that led to scheduling (the scheduler calls this; a lookup for a request that then
        waits another step is not counted, so retries do not inflate the numbers)."""
        if self.enable_prefix_caching:
            self.num_prefix_cache_queries_tokens += num_query_tokens
            self.num_prefix_cache_hits_tokens += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens (all_token_ids[:num_computed_tokens])."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        if blocks is None:
            return
        num_full_blocks = min(min(request.num_computed_tokens, request.num_tokens) // self.block_size, len(blocks))
        first = self.num_registered_blocks.get(rid, 0)
        if num_full_blocks <= first:
            return
        block_hashes = self._block_hashes(request, num_full_blocks)
        tokens = request.all_token_ids
        for i in range(first, num_full_blocks):
            parent_hash = block_hashes[i - 1] if i > 0 else ROOT_BLOCK_HASH
            token_ids = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            self.block_pool.cache_full_block(blocks[i], block_hashes[i], parent_hash, token_ids)
        self.num_registered_blocks[rid] = num_full_blocks

    def reset_prefix_cache(self) -> int:
        """Forget every cached block hash; returns how many were dropped. Safe while requests run."""
        return self.block_pool.reset_prefix_cache()

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Chained hashes of the request's first `num_blocks` full blocks (extends the memo as needed)."""
        hashes = self.req_to_block_hashes.setdefault(request.request_id, [])
        num_blocks = min(num_blocks, request.num_tokens // self.block_size)
        tokens = request.all_token_ids
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent_hash = hashes[-1] if hashes else ROOT_BLOCK_HASH
            token_ids = tokens[i * self.block_size : (i + 1) * self.block_size]
            hashes.append(hashing.hash_block_tokens(parent_hash, token_ids))
        return hashes

    # ------------------------------------------------------------------ allocation
    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: list[int] | None = None
    ) -> bool:
        """Grow the request's block table to cover num_computed_tokens + hit tokens + num_new_tokens tokens.

        `new_computed_block_ids` are prefix-cache hits from `get_computed_blocks`, passed only when the request
        leaves the waiting queue (its table is empty then). Returns False and changes nothing when the free
        blocks (evictable cached ones included) cannot cover it.
        """
        rid = request.request_id
        hit_blocks = [self.block_pool.blocks[i] for i in new_computed_block_ids or ()]
        blocks = self.req_to_blocks.get(rid, [])
        if hit_blocks and blocks:
            raise ValueError(f"request {rid!r} already holds blocks; prefix hits apply to an empty table only")
        num_total_tokens = request.num_computed_tokens + len(hit_blocks) * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.num_blocks_for_tokens(num_total_tokens) - len(blocks) - len(hit_blocks))
        # An unreferenced hit sits in the free queue: taking it uses up one free block too.
        num_free_hits = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.block_pool.num_free_blocks:
            return False
        # Hits first: popping new blocks must not evict a block we are about to share.
        self.block_pool.touch(hit_blocks)
        blocks = self.req_to_blocks.setdefault(rid, [])
        blocks.extend(hit_blocks)
        blocks.extend(self.block_pool.get_new_blocks(num_new_blocks))
        if hit_blocks:
            self.num_registered_blocks[rid] = len(hit_blocks)
        return True

    def free_slots_past(self, request: Request, num_tokens: int) -> int:
        """Drop the blocks of the request's table that hold no slot below `num_tokens` (look-ahead slots of
        rejected proposals), last block first. They were never cached: only computed tokens are. Returns how many
        blocks were dropped."""
        blocks = self.req_to_blocks.get(request.request_id)
        if not blocks:
            return 0
        num_kept = self.num_blocks_for_tokens(num_tokens)
        if num_kept < self.num_registered_blocks.get(request.request_id, 0):
            raise ValueError(f"request {request.request_id!r}: cannot drop blocks registered in the prefix cache")
        dropped = blocks[num_kept:]
        del blocks[num_kept:]
        self.block_pool.free_blocks(reversed(dropped))
        return len(dropped)

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first (see FreeBlockQueue). Freeing twice is a no-op."""
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self.req_to_block_hashes.pop(rid, None)
        self.num_registered_blocks.pop(rid, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Raise AssertionError when ref counts disagree with the block tables or the pool's books are off."""
        self.block_pool.check_integrity()
        ref_cnt_from_tables = [0] * self.num_blocks
        for rid, blocks in self.req_to_blocks.items():
            ids = [b.block_id for b in blocks]
            assert len(ids) == len(set(ids)), f"request {rid!r} holds a block twice: {ids}"
            for block_id in ids:
                ref_cnt_from_tables[block_id] += 1
        for block in self.block_pool.blocks:
            assert block.ref_cnt == ref_cnt_from_tables[block.block_id], (
                f"{block}: ref_cnt {block.ref_cnt} but {ref_cnt_from_tables[block.block_id]} tables hold it"
            )
        num_used = sum(1 for n in ref_cnt_from_tables if n > 0)
        assert num_used + self.num_free_blocks == self.num_blocks, (
            f"{num_used} used + {self.num_free_blocks} free != {self.num_blocks} blocks"
        )
