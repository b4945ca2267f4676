"""Layer 4: the offline Python API for embeddings.

    from inferd.embeddings import Embedder
    embedder = Embedder("/path/to/all-MiniLM-L6-v2")        # a resolved model directory
    vectors = embedder.embed(["a sentence", "another"])      # np.ndarray float32 [2, 384]

`quantization="int8"` runs most linear layers int8 x int8 on CPU (opt-in; vectors within cosine 0.999 of the
float model, not bitwise). Texts longer than the model's max_seq_length are truncated (special tokens kept), as sentence-transformers does;
pass truncate=False to get a ValueError naming the text's index instead. Texts are run in order in packed batches
of at most `max_batch_tokens` tokens and `max_batch_items` texts; a text's vector never depends on its batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from inferd.embeddings.model import EmbeddingModel


def split_by_budget(lengths: Sequence[int], max_batch_tokens: int, max_batch_items: int) -> list[tuple[int, int]]:
    """[start, end) index ranges, in order, each within both limits (a longer item alone gets its own batch)."""
    ranges: list[tuple[int, int]] = []
    start = 0
    batch_tokens = 0
    for i, n in enumerate(lengths):
        if i > start and (batch_tokens + n > max_batch_tokens or i - start >= max_batch_items):
            ranges.append((start, i))
            start, batch_tokens = i, 0
        batch_tokens += n
    if start < len(lengths):
        ranges.append((start, len(lengths)))
    return ranges


class Embedder:
    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str = "none",
        max_batch_tokens: int = 16384,
        max_batch_items: int = 256,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_items < 1:
            raise ValueError("max_batch_tokens and max_batch_items must be >= 1")
        self.model = EmbeddingModel.from_path(model_path, device=device, dtype=dtype, quantization=quantization)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items

    @property
    def dimension(self) -> int:
        return self.model.dimension

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    def embed(self, texts: str | Sequence[str], *, truncate: bool = True) -> np.ndarray:
        """float32 [n, dimension] for n texts (one text: [1, dimension])."""
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
        token_id_lists = self.model.tokenizer.encode_batch(texts, truncate=truncate)
        if not truncate:
            for i, ids in enumerate(token_id_lists):
                if len(ids) > self.max_seq_length:
                    raise ValueError(
                        f"texts[{i}] has {len(ids)} tokens, more than the model's max_seq_length {self.max_seq_length}"
                    )
        return self.embed_token_ids(token_id_lists)

    def embed_token_ids(self, token_id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n, dimension] for n token-id lists (special tokens included, as the tokenizer makes them)."""
        if not token_id_lists:
            return np.zeros((0, self.dimension), dtype=np.float32)
        ranges = split_by_budget([len(ids) for ids in token_id_lists], self.max_batch_tokens, self.max_batch_items)
        return np.concatenate([self.model.embed_token_ids(token_id_lists[s:e]) for s, e in ranges])
