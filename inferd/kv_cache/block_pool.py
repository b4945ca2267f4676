"""Layer 1: the pool of KV blocks, their reference counts, and the prefix cache of full blocks.

A block is one `block_size`-token slice of the runner's KV tensors, named by `block_id`. This module only keeps
the books: who holds which block, which full blocks hold which tokens, and which block is reused next.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

from inferd.kv_cache.hashing import BlockHash


class KVBlock:
    """One block's bookkeeping.

    ref_cnt: number of request block tables that hold this block.
    block_hash: set only while the block is full and registered in the prefix cache; then `parent_block_hash`
    and `token_ids` (exactly block_size ids) are the inputs of that hash, kept so a hit can be verified.
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.parent_block_hash: BlockHash | None = None
        self.token_ids: tuple[int, ...] | None = None

    @property
    def is_cached(self) -> bool:
        return self.block_hash is not None

    def forget_hash(self) -> None:
        self.block_hash = None
        self.parent_block_hash = None
        self.token_ids = None

    def __repr__(self) -> str:
        cached = f", hash={self.block_hash.hex()[:8]}" if self.block_hash is not None else ""
        return f"KVBlock({self.block_id}, ref_cnt={self.ref_cnt}{cached})"


class FreeBlockQueue:
    """The blocks nobody references (ref_cnt == 0), in eviction order.

    Eviction order: a freed block joins the TAIL; allocation pops from the HEAD. So the head is the block that has
    been unreferenced the longest: among unreferenced cached blocks, the least recently used is evicted first.
    A request frees its blocks in reverse order (last block first), so a sequence's tail blocks are evicted
    before its head blocks, which are the ones other requests are most likely to share.
    A cached block that gets a prefix hit while unreferenced is taken out of the queue (`remove`), wherever it is.
    At start every block is free, in block_id order.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        # block_id -> block; OrderedDict gives O(1) pop-from-head, append-to-tail and removal from the middle.
        self._blocks: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: KVBlock) -> bool:
        return block.block_id in self._blocks

    def __iter__(self) -> Iterator[KVBlock]:
        """Head (next to be reused) to tail."""
        return iter(self._blocks.values())

    def popleft(self) -> KVBlock:
        if not self._blocks:
            raise IndexError("no free KV blocks")
        return self._blocks.popitem(last=False)[1]

    def append(self, block: KVBlock) -> None:
        self._blocks[block.block_id] = block

    def remove(self, block: KVBlock) -> None:
        del self._blocks[block.block_id]


class BlockPool:
    """All `num_blocks` blocks, the free queue, and the prefix cache map (block hash -> block).

    Invariants (checked by `check_integrity`):
      a block is in the free queue  <=>  its ref_cnt is 0;
      a block has a block_hash  <=>  the cache map holds it under that hash (one block per hash).
    Unreferenced cached blocks stay cached in the free queue until they are popped for reuse (eviction).
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: unreferenced, cached (evictable) or not."""
        return len(self.free_block_queue)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Pop `num_blocks` from the head of the free queue, evicting their cache entries; each gets ref_cnt 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-cache hits; an unreferenced hit leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the free queue's tail in the order given."""
        for block in blocks_in_eviction_order:
            if block.ref_cnt <= 0:
                raise AssertionError(f"{block} freed more often than it was taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def get_cached_block(
        self, block_hash: BlockHash, parent_block_hash: BlockHash, token_ids: tuple[int, ...]
    ) -> KVBlock | None:
        """The cached block for this hash, or None. A block whose stored hash inputs differ is a miss."""
        block = self.cached_blocks.get(block_hash)
        if block is None or block.parent_block_hash != parent_block_hash or block.token_ids != token_ids:
            return None
        return block

    def cache_full_block(
        self, block: KVBlock, block_hash: BlockHash, parent_block_hash: BlockHash, token_ids: tuple[int, ...]
    ) -> bool:
        """Register a full, computed block under its hash. Returns False (block stays uncached) when another block
        already holds this hash: a twin computed concurrently by another request, or a colliding prefix."""
        if not self.enable_prefix_caching or block.is_cached or block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        block.parent_block_hash = parent_block_hash
        block.token_ids = token_ids
        self.cached_blocks[block_hash] = block
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (blocks in use keep their contents but can no longer be shared).
        Returns the number of cache entries dropped."""
        num_dropped = len(self.cached_blocks)
        for block in self.cached_blocks.values():
            block.forget_hash()
        self.cached_blocks.clear()
        return num_dropped

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.forget_hash()

    def check_integrity(self) -> None:
        """Raise AssertionError when the free queue, ref counts and cache map disagree."""
        free_ids = [b.block_id for b in self.free_block_queue]
        assert len(free_ids) == len(set(free_ids)), "a block is twice in the free queue"
        num_used = num_free_cached = num_free_uncached = 0
        for block in self.blocks:
            is_free = block in self.free_block_queue
            assert block.ref_cnt >= 0, f"{block} has a negative ref_cnt"
            assert is_free == (block.ref_cnt == 0), f"{block}: free-queue membership disagrees with ref_cnt"
            if block.ref_cnt > 0:
                num_used += 1
            elif block.is_cached:
                num_free_cached += 1
            else:
                num_free_uncached += 1
            if block.is_cached:
                assert self.cached_blocks.get(block.block_hash) is block, f"{block} has a hash the cache map lacks"
                assert block.token_ids is not None and block.parent_block_hash is not None, f"{block} lacks hash inputs"
            else:
                assert block.token_ids is None and block.parent_block_hash is None, f"{block} keeps stale hash inputs"
        for block_hash, block in self.cached_blocks.items():
            assert block.block_hash == block_hash, f"cache map entry {block_hash.hex()[:8]} points at {block}"
        assert num_used + num_free_cached + num_free_uncached == self.num_blocks
        assert num_free_cached + num_free_uncached == len(free_ids), "free queue size disagrees with ref counts"
        assert len(self.cached_blocks) <= self.num_blocks
