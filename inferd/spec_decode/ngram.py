"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the sequence's last n tokens.

No extra model: outputs that copy from their input (code edits, quotes, RAG answers, repeated structure) are
predicted from the prompt and the output so far. Longest n first (max_n down to min_n); among matches of one n
the most recent wins, as recent context predicts the continuation best. Cost per call: O(len * n) numpy compares
on the request's tokens.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int = 2, max_n: int = 4, max_lookback_tokens: int = 4096) -> None:
        if not (1 <= min_n <= max_n):
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.max_lookback_tokens = max_lookback_tokens  # search only the last this-many tokens

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` ids that followed the latest earlier match of the last n ids; [] when none."""
        if num_tokens <= 0 or len(token_ids) <= self.min_n:
            return []
        tokens = np.asarray(token_ids[-self.max_lookback_tokens:], dtype=np.int64)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            pattern = tokens[length - n:]
            # windows[s] = tokens[s : s + n] for s + n <= length - 1: at least one token follows each match.
            windows = sliding_window_view(tokens[: length - 1], n)
            starts = np.flatnonzero((windows == pattern).all(axis=1))
            if len(starts):
                follow = int(starts[-1]) + n
                return tokens[follow : follow + num_tokens].tolist()
        return []
