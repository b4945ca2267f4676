"""Seeded benchmark workloads: what each request sends, before any timing.

The bench tool has no tokenizer of its own. Prompts are built from random English words; when the server offers
a tokenizer endpoint, a `TokenCounter` (see `client.make_token_counter`) trims or extends each prompt to the
requested token count, otherwise a fixed tokens-per-word estimate is used. Either way the reported token counts
come from the server's `usage`, never from these estimates.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# text -> number of tokens the server's tokenizer makes of it.
TokenCounter = Callable[[str], int]

DATASET_NAMES = ("random", "prefix-repetition")

# Plain words that BPE vocabularies of English models hold as one or two tokens each.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river green stone light quiet paper garden window summer winter bright simple little early large young "
    "small strong happy open close begin carry bring build climb dance drive follow gather listen measure "
    "notice offer paint plant reach remember share smile teach travel visit wonder write answer blue yellow "
    "orange silver golden market bridge forest island mountain valley ocean cloud storm thunder candle letter"
).split()

# Tokens per word of WORDS (space-separated) for GPT-2-style BPE vocabularies; used only without a tokenizer.
DEFAULT_TOKENS_PER_WORD = 1.0


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: either a completion prompt or chat messages."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int
    # What the dataset aimed for, in the server's tokens when a counter was given; None for file datasets.
    target_prompt_tokens: int | None = None

    def as_chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt}]

    def as_prompt(self) -> str:
        if self.prompt is None:
            raise ValueError("this request has chat messages only; use --endpoint chat")
        return self.prompt


def sample_lengths(rng: random.Random, num: int, mean_len: int, range_ratio: float) -> list[int]:
    """`num` integers uniform in [mean_len * (1 - range_ratio), mean_len * (1 + range_ratio)], each >= 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean_len * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1.0 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num)]


def estimate_tokens_per_word(count_tokens: TokenCounter | None, rng: random.Random) -> float:
    if count_tokens is None:
        return DEFAULT_TOKENS_PER_WORD
    num_sample_words = 400
    sample = " ".join(rng.choice(WORDS) for _ in range(num_sample_words))
    return max(count_tokens(sample), 1) / num_sample_words


def random_text(
    rng: random.Random, num_tokens: int, tokens_per_word: float, count_tokens: TokenCounter | None
) -> str:
    """Random words making about `num_tokens` tokens; exactly, when a counter is given and it can get there.

    With a counter, words are added or dropped a few rounds; the closest text not over the target wins (ties in
    distance go to the shorter), so one long word at the end cannot push a prompt past its length.
    """
    words = [rng.choice(WORDS) for _ in range(max(1, round(num_tokens / tokens_per_word)))]
    if count_tokens is None:
        return " ".join(words)
    best_words, best_key = list(words), None
    max_num_rounds = 6
    for _ in range(max_num_rounds):
        num_counted = count_tokens(" ".join(words))
        key = (num_counted > num_tokens, abs(num_counted - num_tokens))
        if best_key is None or key < best_key:
            best_words, best_key = list(words), key
        if num_counted == num_tokens:
            break
        if num_counted < num_tokens:
            num_missing_words = max(1, math.floor((num_tokens - num_counted) / tokens_per_word))
            words.extend(rng.choice(WORDS) for _ in range(num_missing_words))
        else:
            num_extra_words = max(1, math.floor((num_counted - num_tokens) / tokens_per_word))
            if num_extra_words >= len(words):
                break
            del words[-num_extra_words:]
    return " ".join(best_words)


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    count_tokens: TokenCounter | None = None,
) -> list[BenchRequest]:
    """Independent prompts of about `input_len` tokens (no shared prefixes beyond chance)."""
    rng = random.Random(seed)
    input_lens = sample_lengths(rng, num_prompts, input_len, range_ratio)
    output_lens = sample_lengths(rng, num_prompts, output_len, range_ratio)
    tokens_per_word = estimate_tokens_per_word(count_tokens, rng)
    return [
        BenchRequest(
            prompt=random_text(rng, num_input, tokens_per_word, count_tokens),
            messages=None,
            max_tokens=num_output,
            target_prompt_tokens=num_input,
        )
        for num_input, num_output in zip(input_lens, output_lens)
    ]


def prefix_repetition_requests(
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    seed: int = 0,
    count_tokens: TokenCounter | None = None,
) -> list[BenchRequest]:
    """`num_prefixes` shared prefixes of `prefix_len` tokens, each request adding a unique `suffix_len` suffix.

    Requests cycle through the prefixes (request i uses prefix i % num_prefixes), then the order is shuffled, so a
    server with prefix caching computes each prefix once and every later request with it hits the cache.
    """
    if num_prefixes < 1 or prefix_len < 1 or suffix_len < 1:
        raise ValueError("prefix-repetition needs num_prefixes, prefix_len and suffix_len >= 1")
    rng = random.Random(seed)
    tokens_per_word = estimate_tokens_per_word(count_tokens, rng)
    prefixes = [random_text(rng, prefix_len, tokens_per_word, count_tokens) for _ in range(num_prefixes)]
    requests = [
        BenchRequest(
            prompt=prefixes[i % num_prefixes] + " " + random_text(rng, suffix_len, tokens_per_word, count_tokens),
            messages=None,
            max_tokens=output_len,
            target_prompt_tokens=prefix_len + suffix_len,
        )
        for i in range(num_prompts)
    ]
    rng.shuffle(requests)
    return requests


def file_requests(path: str | Path, num_prompts: int, default_output_len: int) -> list[BenchRequest]:
    """Lines of {"prompt": str} or {"messages": [...]}, optional "max_tokens"; cycled when num_prompts is larger."""
    entries: list[BenchRequest] = []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            body = json.loads(line)
            if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
                raise ValueError(f"{path}:{line_number}: need exactly one of 'prompt' or 'messages'")
            max_tokens = int(body.get("max_tokens", default_output_len))
            if max_tokens < 1:
                raise ValueError(f"{path}:{line_number}: max_tokens must be >= 1")
            if "prompt" in body:
                if not isinstance(body["prompt"], str):
                    raise ValueError(f"{path}:{line_number}: 'prompt' must be a string")
                entries.append(BenchRequest(prompt=body["prompt"], messages=None, max_tokens=max_tokens))
            else:
                if not isinstance(body["messages"], list):
                    raise ValueError(f"{path}:{line_number}: 'messages' must be a list")
                entries.append(BenchRequest(prompt=None, messages=body["messages"], max_tokens=max_tokens))
    if not entries:
        raise ValueError(f"{path}: no requests")
    return [entries[i % len(entries)] for i in range(num_prompts)]


def is_file_dataset(name: str) -> bool:
    return name not in DATASET_NAMES
