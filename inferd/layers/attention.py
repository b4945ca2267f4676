"""Layer 2: paged attention: torch reference (CPU and CUDA), and on CPU in float32 the fused decode kernel of
inferd/kernels (one query token per sequence, K/V read in place through the block table).

KV cache, one tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (index 0 = K, 1 = V).
Token slot s lives at block s // block_size, offset s % block_size.

One step lays the new tokens of B sequences end to end: T tokens, no padding. Sequence i owns tokens
query_start_loc[i] : query_start_loc[i + 1], its first new token sits at position num_computed_tokens[i], and
after this step it holds seq_lens[i] tokens in the cache.

On CPU in float32 with the kernels built, every new token is a decode row of the fused kernel (its own position
as its causal limit), so a token's attention output has the same bits in a prefill, a prefill chunk, a
speculative verify or a decode step, alone or batched: with int8 activations a rounding-level difference would
move an activation across an int8 step and could flip a greedy near-tie. Long prefills pay for it (one dot product
per query row and key: TTFT 1.03x SDPA's at 512 tokens, 1.35x at 1536; benchmarks/offline.py --prefill-tokens,
RESULTS.md). Elsewhere (CUDA, other dtypes, fused ops off) three torch paths, chosen from host-side flags (no device syncs) and numerically interchangeable:
- prefill without cached context: causal SDPA on the new K/V of each sequence (the cache is only written);
- decode only (every query length 1): one gather of [B, max_blocks * block_size] keys through the block
  tables, one SDPA with the B * num_kv_heads groups as batch and the num_heads / num_kv_heads query heads of a
  group as query rows (GQA without repeating K/V);
- mixed: the query-length-1 sequences take the decode path together, every other sequence gathers its
  context through its block table and runs SDPA with a causal mask offset by num_computed_tokens.
Masks and gather indices are built once per step and cached on the metadata, shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from inferd.kernels import DEFAULT_KERNEL_BACKEND, KernelBackend

if TYPE_CHECKING:  # layers never import models at run time (models import layers)
    from inferd.models.arch_config import ModelArchConfig


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    query_start_loc: torch.Tensor  # [B + 1] int64
    query_start_loc_list: list[int]
    seq_lens: torch.Tensor  # [B] int64, tokens in the cache after this step
    seq_lens_list: list[int]
    num_computed_tokens_list: list[int]  # [B], = seq_len - query_len
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    block_size: int
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool  # every query length is 1
    is_prefill_without_context: bool  # every num_computed_tokens is 0
    # Per-step derived tensors (masks, gather indices), filled lazily by the first layer that needs them and
    # reused by the others. Keyed by (kind, sliding_window, dtype).
    derived: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_list[-1]

    def query_len(self, seq_id: int) -> int:
        return self.query_start_loc_list[seq_id + 1] - self.query_start_loc_list[seq_id]

    @classmethod
    def build(
        cls,
        *,
        slot_mapping: torch.Tensor,
        query_start_loc: list[int],
        seq_lens: list[int],
        num_computed_tokens: list[int],
        block_tables: torch.Tensor,
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """From host lists plus the device tensors the runner already filled."""
        num_seqs = len(seq_lens)
        if len(query_start_loc) != num_seqs + 1 or len(num_computed_tokens) != num_seqs:
            raise ValueError("query_start_loc must have B + 1 entries and num_computed_tokens B entries")
        query_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(num_seqs)]
        for i in range(num_seqs):
            if num_computed_tokens[i] + query_lens[i] != seq_lens[i]:
                raise ValueError(
                    f"sequence {i}: num_computed_tokens {num_computed_tokens[i]} + query_len {query_lens[i]} "
                    f"!= seq_len {seq_lens[i]}"
                )
        return cls(
            slot_mapping=slot_mapping,
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int64, device=device),
            query_start_loc_list=list(query_start_loc),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
            seq_lens_list=list(seq_lens),
            num_computed_tokens_list=list(num_computed_tokens),
            block_tables=block_tables,
            block_size=block_size,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            is_decode_only=all(n == 1 for n in query_lens),
            is_prefill_without_context=all(n == 0 for n in num_computed_tokens),
        )


def kv_cache_bytes_per_block(arch_config: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes summed over all layers (K and V)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return 2 * arch_config.num_layers * block_size * arch_config.num_kv_heads * arch_config.head_dim * element_bytes


def allocate_kv_caches(
    arch_config: ModelArchConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer. Zero-filled: gathered padding
    slots are masked out, and a masked slot must hold a finite value (0 * NaN would still be NaN)."""
    shape = (2, num_blocks, block_size, arch_config.num_kv_heads, arch_config.head_dim)
    if torch.device(device).type == "cpu" and dtype in _CALLOC_DTYPES:
        # numpy.zeros is calloc: the OS hands out zero pages on first write, so a 2 GiB pool costs nothing until
        # used (torch.zeros writes every page: ~0.5-1.3 s here, on every keep-alive reload).
        return [torch.from_numpy(np.zeros(shape, dtype=_CALLOC_DTYPES[dtype])) for _ in range(arch_config.num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch_config.num_layers)]


_CALLOC_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


# ---- per-step derived tensors -------------------------------------------------------------------------------


def _decode_seq_ids(md: AttentionMetadata) -> list[int]:
    return [i for i in range(md.num_seqs) if md.query_len(i) == 1]


def _decode_rows(md: AttentionMetadata) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """For the query-length-1 sequences: (token indices [Bd] or None when they are all tokens, their block
    tables [Bd, max_blocks], their seq_lens [Bd])."""
    if md.is_decode_only:
        return None, md.block_tables, md.seq_lens
    cached = md.derived.get("decode_rows")
    if cached is None:
        seq_ids = _decode_seq_ids(md)
        device = md.block_tables.device
        token_indices = torch.tensor([md.query_start_loc_list[i] for i in seq_ids], dtype=torch.int64, device=device)
        seq_index = torch.tensor(seq_ids, dtype=torch.int64, device=device)
        cached = (token_indices, md.block_tables.index_select(0, seq_index), md.seq_lens.index_select(0, seq_index))
        md.derived["decode_rows"] = cached
    return cached


def _token_rows(md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Every new token as a decode row: (its sequence's block table [T, max_blocks], the keys it sees [T], i.e. its
    position + 1)."""
    cached = md.derived.get("token_rows")
    if cached is None:
        query_lens = np.diff(np.asarray(md.query_start_loc_list, dtype=np.int64))
        seq_index = np.repeat(np.arange(md.num_seqs, dtype=np.int64), query_lens)
        first_token = np.repeat(np.asarray(md.query_start_loc_list[:-1], dtype=np.int64), query_lens)
        num_computed = np.repeat(np.asarray(md.num_computed_tokens_list, dtype=np.int64), query_lens)
        seq_lens = num_computed + np.arange(len(seq_index), dtype=np.int64) - first_token + 1
        device = md.block_tables.device
        cached = (md.block_tables.index_select(0, torch.from_numpy(seq_index).to(device)),
                  torch.from_numpy(seq_lens).to(device))
        md.derived["token_rows"] = cached
    return cached


def token_rows(md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Every new token as a decode row, as the fused CPU decoder takes them: (its sequence's block table
    [T, max_blocks], the keys it sees [T], i.e. its position + 1)."""
    if md.is_decode_only:
        return md.block_tables, md.seq_lens
    return _token_rows(md)


def _decode_inputs(
    md: AttentionMetadata, sliding_window: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, int, int]:
    """For the query-length-1 sequences: (token indices [Bd] or None when they are all tokens, flat block ids
    [Bd * num_blocks], additive mask [Bd, 1, 1, S] or None, first key position, num_keys S)."""
    key = ("decode", sliding_window, dtype)
    cached = md.derived.get(key)
    if cached is not None:
        return cached
    device = md.block_tables.device
    token_indices, block_tables, seq_lens = _decode_rows(md)
    seq_ids = list(range(md.num_seqs)) if md.is_decode_only else _decode_seq_ids(md)
    seq_lens_list = [md.seq_lens_list[i] for i in seq_ids]
    max_seq_len = max(seq_lens_list)
    num_blocks = (max_seq_len + md.block_size - 1) // md.block_size
    block_ids = block_tables[:, :num_blocks].reshape(-1)
    if len(seq_ids) == 1:
        # One sequence: slice its keys to the exact range, no mask.
        first_key = 0 if sliding_window is None else max(0, max_seq_len - sliding_window)
        result = (token_indices, block_ids, None, first_key, max_seq_len - first_key)
    else:
        num_keys = num_blocks * md.block_size
        key_pos = torch.arange(num_keys, device=device)[None, :]  # [1, S]
        is_visible = key_pos < seq_lens[:, None]  # [Bd, S]
        if sliding_window is not None:
            is_visible &= key_pos >= seq_lens[:, None] - sliding_window
        mask = torch.zeros(is_visible.shape, dtype=dtype, device=device).masked_fill_(~is_visible, float("-inf"))
        result = (token_indices, block_ids, mask[:, None, None, :], 0, num_keys)
    md.derived[key] = result
    return result


def _context_mask(
    md: AttentionMetadata, seq_id: int, sliding_window: int | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive mask [L, S] for a sequence with L new tokens after num_computed cached ones: new token j (at
    position num_computed + j) sees keys at positions <= its own (and > its own - sliding_window). None when
    a plain top-left causal mask is exact (no cached context, no window cut)."""
    key = ("context", seq_id, sliding_window, dtype)
    if key in md.derived:
        return md.derived[key]
    num_computed = md.num_computed_tokens_list[seq_id]
    seq_len = md.seq_lens_list[seq_id]
    query_len = seq_len - num_computed
    if num_computed == 0 and (sliding_window is None or seq_len <= sliding_window):
        mask = None
    else:
        device = md.block_tables.device
        query_pos = torch.arange(num_computed, seq_len, device=device)[:, None]  # [L, 1]
        key_pos = torch.arange(seq_len, device=device)[None, :]  # [1, S]
        is_visible = key_pos <= query_pos
        if sliding_window is not None:
            is_visible &= key_pos > query_pos - sliding_window
        mask = torch.zeros((query_len, seq_len), dtype=dtype, device=device).masked_fill_(~is_visible, float("-inf"))
    md.derived[key] = mask
    return mask


# ---- attention ----------------------------------------------------------------------------------------------


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, num_kv_heads, head_dim] -> cache slots slot_mapping [T]."""
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    flat = kv_cache.view(2, num_slots, kv_cache.shape[3], kv_cache.shape[4])
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def _gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """kv_cache [2, num_blocks, ...], block_ids [n] -> [2, n, block_size * Hkv * D] (a copy).
    K and V blocks are rows of one [2 * num_blocks, row] matrix, fetched by a single embedding lookup: on CPU
    that is ~7x faster than index_select along dim 1 of the [2, num_blocks, row] view (measured, 80 blocks)."""
    num_blocks = kv_cache.shape[1]
    rows = kv_cache.view(2 * num_blocks, -1)
    k_and_v_rows = torch.cat((block_ids, block_ids + num_blocks))
    return F.embedding(k_and_v_rows, rows).view(2, block_ids.numel(), -1)


def _decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float, sliding_window: int | None,
    backend: KernelBackend = DEFAULT_KERNEL_BACKEND,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """q [T, H, D] -> (token indices or None, out [Bd, H, D]) for the query-length-1 sequences."""
    if backend.use_cpu_ops(q) and kv_cache.is_contiguous():
        # Fused CPU kernel: K/V read in place through the block tables, no gathered copy, no mask.
        token_indices, block_tables, seq_lens = _decode_rows(md)
        q_dec = q if token_indices is None else q.index_select(0, token_indices)
        out = torch.ops.inferd.paged_decode_attention(q_dec, kv_cache, block_tables, seq_lens, scale, sliding_window or 0)
        return token_indices, out
    token_indices, block_ids, mask, first_key, num_keys = _decode_inputs(md, sliding_window, q.dtype)
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    q_dec = q if token_indices is None else q.index_select(0, token_indices)
    num_seqs = q_dec.shape[0]
    # [2, Bd * num_blocks, block_size, Hkv, D] -> [2, Bd, S_all, Hkv, D]
    kv = _gather_blocks(kv_cache, block_ids).view(2, num_seqs, -1, num_kv_heads, head_dim)
    kv = kv[:, :, first_key : first_key + num_keys].transpose(2, 3)  # [2, Bd, Hkv, S, D]
    group_size = q.shape[1] // num_kv_heads
    q_groups = q_dec.view(num_seqs, num_kv_heads, group_size, head_dim)
    out = F.scaled_dot_product_attention(q_groups, kv[0], kv[1], attn_mask=mask, scale=scale)
    return token_indices, out.reshape(num_seqs, num_kv_heads * group_size, head_dim)


def _sequence_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    seq_id: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One sequence's new tokens q [L, H, D] against its whole context -> [L, H, D]. k, v [L, Hkv, D] are its
    new keys/values (used directly when there is no cached context)."""
    mask = _context_mask(md, seq_id, sliding_window, q.dtype)
    num_computed = md.num_computed_tokens_list[seq_id]
    if num_computed == 0:
        keys, values = k, v
    else:
        seq_len = md.seq_lens_list[seq_id]
        num_blocks = (seq_len + md.block_size - 1) // md.block_size
        kv = _gather_blocks(kv_cache, md.block_tables[seq_id, :num_blocks])
        kv = kv.view(2, num_blocks * md.block_size, kv_cache.shape[3], kv_cache.shape[4])[:, :seq_len]
        keys, values = kv[0], kv[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, H, L, D]
        keys.transpose(0, 1).unsqueeze(0),  # [1, Hkv, S, D]
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    backend: KernelBackend = DEFAULT_KERNEL_BACKEND,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] (new tokens, any strides) -> out [T, H, D]. Writes k/v into kv_cache first.
    backend: the model's kernel backend (the fused CPU kernel or the torch code)."""
    write_kv_cache(kv_cache, k, v, md.slot_mapping)
    if md.is_decode_only:
        return _decode_attention(q, kv_cache, md, scale, sliding_window, backend)[1]
    if backend.use_cpu_ops(q) and kv_cache.is_contiguous():
        # Every new token as its own decode row (its causal limit as its seq_len): a token's output is then the
        # same bits whether it arrives in a prefill, a prefill chunk, a speculative verify or a decode step.
        block_tables, seq_lens = _token_rows(md)
        return torch.ops.inferd.paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, sliding_window or 0)
    if md.num_seqs == 1:
        return _sequence_attention(q, k, v, kv_cache, md, 0, scale, sliding_window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q itself is a strided view
    has_decodes = False
    for seq_id in range(md.num_seqs):
        start, end = md.query_start_loc_list[seq_id], md.query_start_loc_list[seq_id + 1]
        if end - start == 1 and not md.is_prefill_without_context:
            has_decodes = True
            continue
        out[start:end] = _sequence_attention(
            q[start:end], k[start:end], v[start:end], kv_cache, md, seq_id, scale, sliding_window
        )
    if has_decodes:
        token_indices, decode_out = _decode_attention(q, kv_cache, md, scale, sliding_window, backend)
        out.index_copy_(0, token_indices, decode_out)
    return out
