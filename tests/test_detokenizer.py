"""Incremental detokenizer: streamed deltas against a full `Tokenizer.decode` of the same ids.

The references are the tokenizer's one-shot decode (itself checked against transformers in test_tokenizer.py) and
Python's str.find for where a stop string first occurs in that decode.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from inferd.engine.detokenizer import IncrementalDetokenizer
from inferd.engine.tokenizer import Tokenizer
from inferd.request import SamplingParams

TEXTS = [
    "Hello, world! This is a plain ASCII sentence with numbers 12345 and 3.14.",
    "Emoji everywhere: 😀😃😄 🎉🎊 👍🏽 👨‍👩‍👧‍👦 ❤️ 🇫🇷🇯🇵 done.",
    "中文文本测试：你好，世界！日本語のテキストも。한국어도 있습니다.",
    "Mixed 😀中文 café naïve Ångström ∑∫√ ≤≥ and code `x = 1`.",
    "def f(x):\n    return x ** 2\n\n\n\tindented\n",
    "<|im_start|>assistant\nSpecial tokens inside<|im_end|> text<|endoftext|>",
]

PROMPT = "<|im_start|>user\nTell me something.<|im_end|>\n<|im_start|>assistant\n"


def _chunks(ids: list[int], rng: random.Random, max_chunk: int) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        out.append(ids[i : i + n])
        i += n
    return out


def _stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str | None]:
    """Feed chunks as an engine would: update, then take the delta; stop feeding once a stop string hits."""
    deltas, stop = [], None
    for i, chunk in enumerate(chunks):
        stop = detok.update(chunk)
        finished = stop is not None or i == len(chunks) - 1
        deltas.append(detok.get_next_output_text(finished=finished, delta=True))
        assert detok.get_next_output_text(finished=finished, delta=False) == "".join(deltas)
        if stop is not None:
            break
    return deltas, stop


def _output_id_sequences(tokenizer: Tokenizer, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    sequences = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    # Random ids: byte-level tokens in any order, so characters split across tokens, invalid UTF-8 and stray
    # special tokens all occur; the last one ends on a lone UTF-8 lead byte.
    sequences += [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(30)]
    emoji_ids = tokenizer.encode("🎉", add_special_tokens=False)
    sequences.append(tokenizer.encode("ok ", add_special_tokens=False) + emoji_ids[:1])
    return sequences


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("max_chunk", [1, 3])
def test_stream_concatenates_to_full_decode(
    default_tokenizer: Tokenizer, skip_special_tokens: bool, max_chunk: int
) -> None:
    rng = random.Random(max_chunk)
    prompt_ids = default_tokenizer.encode(PROMPT)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    for ids in _output_id_sequences(default_tokenizer, seed=7):
        full = default_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        detok = IncrementalDetokenizer(default_tokenizer, prompt_ids, params)
        deltas, stop = _stream(detok, _chunks(ids, rng, max_chunk))
        assert stop is None
        assert "".join(deltas) == full
        assert detok.output_text == full
        assert detok.output_token_ids == ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)
        # Before the end, a delta never ends inside a character: only the final flush may show U+FFFD.
        for delta in deltas[:-1]:
            assert not delta.endswith("\ufffd") or "\ufffd" in full


def test_multibyte_characters_are_held_until_complete(default_tokenizer: Tokenizer) -> None:
    text = "🎉中"
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    token_bytes_split = [default_tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(s.endswith("\ufffd") for s in token_bytes_split), "test needs a character split across tokens"
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams())
    seen = ""
    for token_id in ids:
        detok.update([token_id])
        seen += detok.get_next_output_text(finished=False, delta=True)
        assert "\ufffd" not in seen and text.startswith(seen)
    assert seen == text


def _stop_cases(tokenizer: Tokenizer) -> list[tuple[list[int], list[str]]]:
    """(output ids, stop strings) where each stop string starts inside one token and ends inside a later one."""
    cases = []
    for text in TEXTS[:5]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(ids)
        # Character offsets where tokens end, from decoding growing prefixes (a reference, not our detokenizer).
        boundaries = sorted({len(tokenizer.decode(ids[: i + 1]).rstrip("\ufffd")) for i in range(len(ids))})
        for start_at in (len(full) // 4, len(full) // 2, len(full) - 6):
            # Start one character after a token boundary, span at least one boundary.
            start = next(b for b in boundaries if b >= start_at) + 1
            stop = full[start : start + 5]
            if len(stop) == 5:
                cases.append((ids, [stop]))
        cases.append((ids, ["never appears", full[-3:]]))
        # The stop string that completes first wins, whatever the list order and wherever the others start.
        cases.append((ids, [full[5:15], full[10:12]]))
        cases.append((ids, [full[10:12], full[8:12]]))
    return cases


@pytest.mark.parametrize("include_stop_str_in_output", [False, True])
@pytest.mark.parametrize("max_chunk", [1, 4])
def test_stop_strings_across_token_boundaries(
    default_tokenizer: Tokenizer, include_stop_str_in_output: bool, max_chunk: int
) -> None:
    rng = random.Random(max_chunk)
    for ids, stops in _stop_cases(default_tokenizer):
        full = default_tokenizer.decode(ids)
        # Generation stops when a stop string first completes: the earliest end in the full decode (ties: the
        # longer one, which started earlier).
        _, first_start, first_stop = min((full.find(s) + len(s), full.find(s), s) for s in stops if s in full)
        end = first_start + len(first_stop) if include_stop_str_in_output else first_start
        expected = full[:end]

        params = SamplingParams(stop=stops, include_stop_str_in_output=include_stop_str_in_output)
        detok = IncrementalDetokenizer(default_tokenizer, [], params)
        deltas, stop = _stream(detok, _chunks(ids, rng, max_chunk))
        streamed = "".join(deltas)
        assert stop == first_stop
        assert streamed == expected
        assert detok.output_text == expected
        if not include_stop_str_in_output:
            assert not any(s in streamed for s in stops)
            # Nothing streamed before the end may contain a stop string either (the holdback guarantees it).
            for n in range(1, len(deltas)):
                assert not any(s in "".join(deltas[:n]) for s in stops)


def test_running_stream_holds_back_possible_stop_prefix(default_tokenizer: Tokenizer) -> None:
    params = SamplingParams(stop=["STOP!"])
    detok = IncrementalDetokenizer(default_tokenizer, [], params)
    ids = default_tokenizer.encode("abc STO", add_special_tokens=False)
    detok.update(ids)
    text = default_tokenizer.decode(ids)
    assert detok.get_next_output_text(finished=False, delta=True) == text[: len(text) - (len("STOP!") - 1)]
    assert detok.get_next_output_text(finished=True, delta=True) == text[len(text) - (len("STOP!") - 1) :]


def test_stop_terminated_token_is_not_decoded(default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("Done.", add_special_tokens=False) + [default_tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(default_tokenizer, [], SamplingParams(skip_special_tokens=False))
    detok.update(ids[:-1])
    detok.update(ids[-1:], stop_terminated=True)
    assert detok.get_next_output_text(finished=True, delta=False) == default_tokenizer.decode(ids[:-1])
    assert detok.output_token_ids == ids


def test_min_tokens_defers_stop_strings(default_tokenizer: Tokenizer) -> None:
    ids = default_tokenizer.encode("a, b, c, d", add_special_tokens=False)
    for min_tokens in (0, 3):
        params = SamplingParams(stop=[","], min_tokens=min_tokens, max_tokens=10)
        detok = IncrementalDetokenizer(default_tokenizer, [], params)
        stops = [detok.update([i]) for i in ids]
        first_hit = next(n for n, s in enumerate(stops) if s is not None)
        # The first "," completed once at least min_tokens tokens exist; the newest token's text holds it.
        full = default_tokenizer.decode(ids[: first_hit + 1])
        assert first_hit + 1 >= min_tokens
        assert "," in full[len(default_tokenizer.decode(ids[:first_hit])) :]
        assert detok.output_text == full[: full.rfind(",")]
        if min_tokens == 0:
            assert detok.output_text == full[: full.find(",")]


class _CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call sees."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.decode_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_work_per_step_does_not_grow_with_output(default_tokenizer: Tokenizer) -> None:
    counting = _CountingTokenizer(default_tokenizer)
    ids = default_tokenizer.encode(" ".join(TEXTS[:5]) * 20, add_special_tokens=False)
    assert len(ids) > 1000
    prompt_ids = default_tokenizer.encode(PROMPT)
    detok = IncrementalDetokenizer(counting, prompt_ids, SamplingParams())  # type: ignore[arg-type]
    for token_id in ids:
        detok.update([token_id])
    assert detok.output_text == default_tokenizer.decode(ids)
    # A window spans the previous step's ids, any ids of a character still incomplete (<= 4 bytes), and the new id.
    assert max(counting.decode_lengths) <= 12


def test_sentencepiece_stream_keeps_leading_space_after_prompt(tiny_sentencepiece_hf_dir: Path) -> None:
    """With a "▁"-prefix decoder, an output's first word carries the space that a standalone decode strips:
    the stream equals decode(prompt + output) minus decode(prompt), and decode(output) when there is no prompt."""
    tokenizer = Tokenizer.from_pretrained(tiny_sentencepiece_hf_dir)
    prompt_ids = tokenizer.encode("The quick brown fox")
    rng = random.Random(3)
    for text in TEXTS[:4] + [" jumps over the lazy dog 你好 😀"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for prompt, expected in (
            (prompt_ids, tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)) :]),
            ([], tokenizer.decode(ids)),
        ):
            detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
            deltas, _ = _stream(detok, _chunks(ids, rng, 2))
            assert "".join(deltas) == expected
            assert not any("\ufffd" in d for d in deltas)
