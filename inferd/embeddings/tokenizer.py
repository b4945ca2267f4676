"""Layer 4: text -> token ids for an encoder, from the model directory's tokenizer.json (the Rust `tokenizers`).

Two backend copies: one never truncates (the server must see an input's full length to reject it by index), one
truncates to `max_seq_length` keeping the special tokens, as sentence-transformers does (`truncation=True`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tokenizers import Tokenizer as BackendTokenizer


class EmbedTokenizer:
    def __init__(self, backend: BackendTokenizer, max_seq_length: int, *, do_lower_case: bool = False) -> None:
        self._full = backend
        self._full.no_padding()
        self._full.no_truncation()
        self._truncating = BackendTokenizer.from_str(backend.to_str())
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_seq_length)
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case  # sentence-transformers' old flag: lower-case before tokenizing
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: str, max_seq_length: int, *, do_lower_case: bool = False) -> EmbedTokenizer:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (the fast tokenizer file is required)")
        return cls(BackendTokenizer.from_file(path), max_seq_length, do_lower_case=do_lower_case)

    def _prepare(self, text: str) -> str:
        return text.lower() if self.do_lower_case else text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """All of the text's ids (never truncated)."""
        return self._full.encode(self._prepare(text), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, truncate: bool = False) -> list[list[int]]:
        """Ids of every text, with special tokens; truncate: cut to max_seq_length (special tokens kept)."""
        backend = self._truncating if truncate else self._full
        if len(texts) == 1:  # the common server request: no dispatch to the Rust thread pool
            return [backend.encode(self._prepare(texts[0]), add_special_tokens=True).ids]
        return [e.ids for e in backend.encode_batch([self._prepare(t) for t in texts], add_special_tokens=True)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._full.decode(list(token_ids), skip_special_tokens=True)
