"""Layer 1: paged KV-cache bookkeeping (block pool, chained prefix hash, per-request block tables). No torch."""

from inferd.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVBlock
from inferd.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "FreeBlockQueue", "KVBlock", "KVCacheManager"]
