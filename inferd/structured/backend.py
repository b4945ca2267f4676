"""Grammar compilation and matching on llguidance, the one module that imports it.

Why llguidance (benchmarks/grammar_backends.py, RESULTS.md "Grammar backends"): no runtime dependencies,
JSON Schema + regex + Lark (and GBNF through its converter) in one engine, masks in tens of microseconds with
no per-grammar precompilation over the vocabulary, and rollback, which speculative decoding needs.

- `GrammarCompiler` (one per engine) wraps the model's tokenizer once (~0.2 s for a 49k vocabulary, built on the
  first constrained request) and turns a `StructuredOutputsParams` into a `CompiledGrammar`, caching the most
  recent ones by constraint (a repeated schema costs a dict lookup). Thread-safe: the server compiles on a worker
  thread so a slow grammar never stalls the engine's step loop.
- `CompiledGrammar.new_matcher()` copies a warmed template matcher (each sequence of n > 1 gets its own).
- `GrammarMatcher` is one sequence's parse state: fill its bitmask row before a step, accept the sampled
  tokens after it, roll back speculative look-ahead.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Callable, Iterable

import llguidance
import llguidance.gbnf_to_lark
from torch import Tensor

from inferd.errors import InvalidParameterError
from inferd.request import StructuredOutputsParams

# Compiled grammars kept per engine; a constraint evicted from here is compiled again on its next use.
DEFAULT_CACHE_SIZE = 256
# Parser limits beyond llguidance's defaults would let one request's grammar take seconds of CPU per token.
_LOG_LEVEL_QUIET = 0


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def _lark_string(text: str) -> str:
    """A Lark string literal for `text` (JSON escapes are a subset of what llguidance's Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


def grammar_source(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for a constraint. Raises InvalidParameterError naming the field."""
    try:
        if params.json is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(params.json)
        if params.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
        if params.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if params.choice is not None:
            lark = "start: " + " | ".join(_lark_string(c) for c in params.choice)
            return llguidance.LLMatcher.grammar_from_lark(lark)
        assert params.grammar is not None
        # GBNF (llama.cpp's, rules written with ::=) is converted to Lark; Lark passes through.
        return llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark.any_to_lark(params.grammar))
    except Exception as exc:  # the GBNF converter raises assorted types on a bad grammar
        raise _invalid(params, _first_line(exc)) from None


def _invalid(params: StructuredOutputsParams, detail: str) -> InvalidParameterError:
    """The error for a rejected constraint: the param is the top-level request field of `params.source`
    ("tools[2].function.parameters" -> "tools"); the message starts with the full path."""
    return InvalidParameterError(re.split(r"[.\[]", params.source, maxsplit=1)[0], f"{params.source}: {detail}")


_MAX_ERROR_CHARS = 400


def _first_line(exc: BaseException | str) -> str:
    """The backend's message on one line (a regex error spans several: the pattern, a caret, the reason)."""
    text = " ".join(str(exc).split())
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


class GrammarMatcher:
    """One sequence's position in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a contiguous CPU int32 [R, W] bitmask (releases the GIL)."""
        row_view = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(row_view.data_ptr(), row_view.numel() * row_view.element_size())

    def accept_token(self, token_id: int) -> bool:
        """Advance over a sampled token; False (and the matcher is then in error for good) if it was not allowed."""
        return self._matcher.consume_token(token_id)

    def num_valid_tokens(self, token_ids: list[int]) -> int:
        """How many leading `token_ids` the grammar accepts from here, without advancing."""
        return self._matcher.validate_tokens(token_ids)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)

    @property
    def is_stopped(self) -> bool:
        """The constraint is complete and admits no further token (an error state counts as stopped)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class CompiledGrammar:
    def __init__(self, params: StructuredOutputsParams, template: llguidance.LLMatcher, compile_seconds: float) -> None:
        self.params = params
        self._template = template
        self.compile_seconds = compile_seconds

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy())


class GrammarCompiler:
    """Compiles constraints for one model's tokenizer. `tokenizer_json` gives the model's `tokenizers` JSON (called
    once, lazily); `vocab_size` is the width of the model's logits (may exceed the tokenizer's vocabulary)."""

    def __init__(
        self,
        tokenizer_json: Callable[[], str],
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[tuple, CompiledGrammar] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self.num_compiles = 0  # cumulative cache misses (grammars built)
        self.num_cache_hits = 0  # cumulative
        self.tokenizer_setup_seconds = 0.0

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                start = time.perf_counter()
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(), n_vocab=self.vocab_size, eos_token=self._eos_token_ids or None
                )
                self.tokenizer_setup_seconds = time.perf_counter() - start
            return self._ll_tokenizer

    def is_cached(self, params: StructuredOutputsParams) -> bool:
        with self._lock:
            return params.cache_key in self._cache

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar for `params` (cached). Raises InvalidParameterError naming `params.source` for a
        grammar or schema llguidance rejects (a syntax error, an unsupported JSON Schema keyword, ...)."""
        key = params.cache_key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return compiled
        start = time.perf_counter()
        source = grammar_source(params)
        ll_tokenizer = self.ll_tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, ll_tokenizer)
        if is_error:
            raise _invalid(params, _first_line(messages[0]))
        template = llguidance.LLMatcher(ll_tokenizer, source, log_level=_LOG_LEVEL_QUIET)
        if template.is_error():
            raise _invalid(params, _first_line(template.get_error()))
        compiled = CompiledGrammar(params, template, time.perf_counter() - start)
        with self._lock:
            self.num_compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled
