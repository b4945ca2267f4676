"""Layer 1: the chained hash that names a full KV block by its whole prefix.

block_hash[i] = sha256(block_hash[i-1] || token ids of block i as little-endian int64)

sha256 rather than Python's `hash()`: it is the same in every process and on every machine (no PYTHONHASHSEED),
and 32 bytes make an accidental collision negligible. Correctness never rests on that, though: a hash hit is
confirmed by comparing the parent hash and the token ids stored in the block (see BlockPool.get_cached_block).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes  # 32-byte sha256 digest

# Parent of the first block of every sequence.
ROOT_BLOCK_HASH: BlockHash = b""


def hash_block_tokens(parent_block_hash: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    h = hashlib.sha256(parent_block_hash)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()
