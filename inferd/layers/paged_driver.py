"""Layer 2: drive a model over a paged KV cache without the engine: a trivial block allocator plus the
per-step tensors the runner would build. For layer-level tests, timing scripts and examples; the engine uses
kv_cache/ and runner/ instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from inferd.layers.attention import AttentionMetadata, allocate_kv_caches

if TYPE_CHECKING:  # layers never import models at run time (models import layers)
    from inferd.models.arch_config import ModelArchConfig


@dataclass
class _Sequence:
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)


class PagedDriver:
    """Blocks are handed out from a shuffled free list (seeded), so block tables are never contiguous."""

    def __init__(
        self,
        model: torch.nn.Module,
        arch_config: ModelArchConfig,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        dtype = next(model.parameters()).dtype
        self.kv_caches = allocate_kv_caches(arch_config, num_blocks, block_size, dtype, self.device)
        self.free_block_ids = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_block_ids)
        self.seqs: dict[str, _Sequence] = {}

    def share_prefix(self, new_seq: str, source_seq: str, num_blocks: int) -> None:
        """Start `new_seq` with the first num_blocks full blocks of `source_seq` already computed (what a prefix
        cache hit hands the runner)."""
        src = self.seqs[source_seq]
        num_tokens = num_blocks * self.block_size
        if len(src.token_ids) < num_tokens:
            raise ValueError(f"{source_seq} has only {len(src.token_ids)} cached tokens")
        self.seqs[new_seq] = _Sequence(list(src.token_ids[:num_tokens]), list(src.block_ids[:num_blocks]))

    def num_cached_tokens(self, seq: str) -> int:
        return len(self.seqs[seq].token_ids) if seq in self.seqs else 0

    @torch.inference_mode()
    def step(self, chunks: list[tuple[str, list[int]]]) -> torch.Tensor:
        """Append chunks of new tokens to sequences (new names start empty) in one forward; returns the logits of
        every new token, [T, vocab] float32, in chunk order."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        num_computed: list[int] = []
        tables: list[list[int]] = []
        for name, new_ids in chunks:
            seq = self.seqs.setdefault(name, _Sequence())
            start = len(seq.token_ids)
            end = start + len(new_ids)
            while len(seq.block_ids) * self.block_size < end:
                seq.block_ids.append(self.free_block_ids.pop())
            for pos in range(start, end):
                slots.append(seq.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids += new_ids
            positions += range(start, end)
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            num_computed.append(start)
            tables.append(list(seq.block_ids))
            seq.token_ids += new_ids
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int64)
        md = AttentionMetadata.build(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            num_computed_tokens=num_computed,
            block_tables=block_tables.to(self.device),
            block_size=self.block_size,
            device=self.device,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, md, self.kv_caches)
        return self.model.compute_logits(hidden)
