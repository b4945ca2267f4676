"""Layer 4: the synchronous embedding model: tokenizer + packed encoder + pooling + normalisation.

`EmbeddingModel.from_path(dir)` reads a sentence-transformers (or plain Hugging Face BERT-family) directory;
`embed_token_ids(lists)` runs one packed batch and returns float32 vectors [n, dimension]. Callers split work into
batches (the server's micro-batcher, `Embedder`); this class never pads and never reorders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from inferd.device import resolve_device, resolve_dtype, torch_dtype
from inferd.embeddings.tokenizer import EmbedTokenizer
from inferd.models.bert import (
    BertEncoder,
    PoolingConfig,
    is_encoder_dir,
    load_bert_encoder,
    read_encoder_config,
    read_sentence_encoder_files,
)


class EmbeddingModel:
    def __init__(
        self, encoder: BertEncoder | None, tokenizer: EmbedTokenizer, pooling: PoolingConfig, *,
        hidden_size: int = 0, device: str = "", dtype: torch.dtype | None = None,
    ) -> None:
        """`encoder` None: a model without its weights (from_path(load_weights=False): tokenizer, limits and
        dimension for a server whose worker process computes); hidden_size, device and dtype then say the rest."""
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_seq_length = tokenizer.max_seq_length  # tokens, special tokens included
        if encoder is not None:
            hidden_size = encoder.config.hidden_size
            device = str(encoder.word_embeddings.weight.device)
            dtype = encoder.word_embeddings.weight.dtype
        self.dimension = hidden_size * len(pooling.modes)
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_path(
        cls, path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto", quantization: str = "none",
        load_weights: bool = True,
    ) -> EmbeddingModel:
        """A resolved model directory (config.json of a BERT-family encoder, *.safetensors, tokenizer.json).
        quantization "int8": most linear layers int8 x int8 on CPU (inferd.models.bert.INT8_LINEAR_NAMES; opt-in,
        lowest cosine against sentence-transformers 0.9995 on all-MiniLM-L6-v2, benchmarks/RESULTS.md).
        load_weights=False: everything but the encoder (embed_token_ids then raises)."""
        path = os.fspath(path)
        if not is_encoder_dir(path):
            raise ValueError(f"{path!r} is not a directory with config.json of a BERT-family encoder (bert, roberta, xlm-roberta)")
        resolved_device = resolve_device(device)
        resolved_dtype = resolve_dtype(dtype, resolved_device)
        files = read_sentence_encoder_files(path)
        config = read_encoder_config(path)
        max_seq_length = min(files.max_seq_length or config.max_num_positions, config.max_num_positions)
        tokenizer = EmbedTokenizer.from_dir(path, max_seq_length, do_lower_case=files.do_lower_case)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} ids, the encoder {config.vocab_size}")
        if not load_weights:
            return cls(None, tokenizer, files.pooling, hidden_size=config.hidden_size, device=resolved_device,
                       dtype=torch_dtype(resolved_dtype))
        encoder = load_bert_encoder(path, resolved_device, torch_dtype(resolved_dtype), quantization=quantization)
        return cls(encoder, tokenizer, files.pooling)

    def check_token_ids(self, token_ids: Sequence[int]) -> None:
        """ValueError unless 1..max_seq_length ids, each in the vocabulary."""
        if not token_ids:
            raise ValueError("an input has no tokens")
        if len(token_ids) > self.max_seq_length:
            raise ValueError(f"an input has {len(token_ids)} tokens, more than the model's {self.max_seq_length}")
        vocab_size = self.tokenizer.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")

    def embed_token_ids(self, token_id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """One packed batch -> float32 [n, dimension] (L2-normalised when the model says so)."""
        if self.encoder is None:
            raise RuntimeError("this EmbeddingModel was loaded without its weights (load_weights=False)")
        for token_ids in token_id_lists:
            self.check_token_ids(token_ids)
        with torch.inference_mode():
            pooled = self.encoder.encode(token_id_lists, self.pooling)
        return pooled.float().cpu().numpy()

    def flops(self, num_tokens_per_seq: Sequence[int]) -> int:
        """FLOPs of embedding sequences of these lengths (linear layers and attention; for benchmarks)."""
        return sum(n * self.encoder.config.flops_per_token(n) for n in num_tokens_per_seq)
