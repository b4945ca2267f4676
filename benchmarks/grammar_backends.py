"""Grammar libraries for structured output (issue 12): llguidance vs xgrammar vs outlines-core, one run.

    .venv/bin/python benchmarks/grammar_backends.py [--model smollm2-135m-instruct] [--repeats 3]
        [--batch 16] [--json-out out/grammar_backends.json] [--no-torch-compile]

On the model's own tokenizer (the default model's GGUF vocabulary, 49,152 tokens), for each backend:
1. Import and tokenizer setup time (one-time per model).
2. Per case (the 30 JSON schemas of tests/structured_schemas.py, two regexes, a choice list, a Lark grammar and
   the same grammar in GBNF/EBNF): cold compile time on a fresh compiler with caching off (median of
   `--repeats`), time of the first mask, and whether it compiled at all (coverage; the error's first line).
3. Per-token mask time: the tokens of the case's valid example (`model_dump_json()` for schemas) are walked
   through fresh matchers, the next-token bitmask filled before every token and EOS checked allowed at the end;
   batch 1 (one matcher) and batch `--batch` (matchers advanced in lockstep, each library's batch API:
   llguidance LLExecutor, xgrammar BatchGrammarMatcher; outlines-core has none, so a loop). Median and p99
   microseconds per step over all steps of all cases, plus the token-accept time per step.
4. Enforcement probes: invalid instances (a bound, multipleOf, a pattern, formats, maxItems, an enum) walked the
   same way: does the mask stop them? A backend that compiles a schema but ignores a keyword passes these.
   24 hand-written schemas with keywords pydantic does not emit (allOf, if/then/else, uniqueItems, ...), each with
   a valid and an invalid instance checked by `jsonschema`: compiles? accepts the one, stops the other?
   A rollback probe: roll a matcher back 5 tokens (speculative decoding's rejected drafts); same mask again?
5. Applying a [B, V] int32 bitmask to float32 logits on CPU: a plain torch shift-table unpack (no compile),
   numpy's unpackbits, xgrammar's C++ CPU kernel, llguidance.torch (torch.compile; first call reported apart).
Backends alternate in a rotating order for every case, because these 2-core machines are shared and noisy; read
the ratios between backends measured in this one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

LARK_GRAMMAR = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
# The same language in GBNF / xgrammar EBNF.
EBNF_GRAMMAR = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= num | "(" expr ")"
num ::= [0-9]+
"""
CHOICES = ["positive", "negative", "neutral"]
EMAIL_REGEX = r"[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,4}"
DATE_REGEX = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"

# (schema class name, invalid instance, the keyword it breaks)
INVALID_PROBES = [
    ("Person", '{"name":"Ada","age":200}', "maximum"),
    ("Product", '{"name":"Tea","price":2.5,"quantity":1,"pack_size":7}', "multipleOf"),
    ("Temperature", '{"city":"Oslo","celsius":-3.5,"unit":"F"}', "const"),
    ("Paint", '{"color":"pink","finish":"matte","liters":5}', "enum"),
    ("Account", '{"username":"Ada","pin":"1815","bio":"Writes programs."}', "pattern"),
    ("Account", '{"username":"ada_l","pin":"1815","bio":"Hi"}', "minLength"),
    ("ShoppingList", '{"items":["a","b","c","d","e","f"]}', "maxItems"),
    ("ShoppingList", '{"items":[]}', "minItems"),
    ("Event", '{"name":"x","day":"2025-13-45","starts_at":"2025-06-12T12:30:00Z"}', "format: date"),
    ("Contact", '{"name":"Grace","email":"not-an-email"}', "format: email"),
    ("Ticket", '{"ticket_id":"abc","summary":"x"}', "format: uuid"),
    ("Bookmark", '{"title":"x","url":"not a url"}', "format: uri"),
    ("Pixel", '{"position":[1,2,3],"rgb":[1,2,3]}', "prefixItems length"),
    ("Sentiment", '{"label":"positive","confidence":0.9,"extra":1}', "extra property, schema silent"),
    ("Sentiment:strict", '{"label":"positive","confidence":0.9,"extra":1}', "additionalProperties: false"),
    ("Drawing", '{"shape":{"side":2},"label":"x"}', "anyOf"),
]

# JSON-Schema keywords pydantic does not emit but clients send: (name, schema, a valid instance, an invalid one).
# The `jsonschema` package checks each pair at start-up, so both are what the schema says they are.
HAND_SCHEMAS = [
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     '{"a":1,"b":"x"}', '{"a":1}'),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 4},
     "[1,2,3]", "[1,1]"),
    ("minProperties", {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2},
     '{"a":1,"b":2}', '{"a":1}'),
    ("patternProperties", {"type": "object", "patternProperties": {"^x_[a-z]+$": {"type": "integer"}},
                           "additionalProperties": False}, '{"x_ab":1}', '{"y":1}'),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]{1,5}$"},
                       "additionalProperties": {"type": "integer"}}, '{"ab":1}', '{"ABC":1}'),
    ("typed additionalProperties", {"type": "object", "additionalProperties": {"type": "string"}},
     '{"k":"v"}', '{"k":1}'),
    ("if/then/else", {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
                      "required": ["kind", "n"],
                      "if": {"properties": {"kind": {"const": "a"}}}, "then": {"properties": {"n": {"maximum": 5}}}},
     '{"kind":"a","n":3}', '{"kind":"a","n":9}'),
    ("not", {"type": "string", "not": {"enum": ["forbidden"]}}, '"fine"', '"forbidden"'),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}, "maxItems": 4},
     "[1,7]", "[1,2]"),
    ("dependentRequired", {"type": "object", "properties": {"card": {"type": "string"}, "cvv": {"type": "string"}},
                           "dependentRequired": {"card": ["cvv"]}}, '{"card":"1","cvv":"2"}', '{"card":"1"}'),
    ("oneOf, overlapping", {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 10}]}, "3", "12"),
    ("type list", {"type": ["string", "null"]}, "null", "1"),
    ("enum of mixed types", {"enum": [1, "two", None, True]}, '"two"', "2"),
    ("const object", {"const": {"a": 1}}, '{"a":1}', '{"a":2}'),
    ("definitions (draft-07)", {"definitions": {"p": {"type": "integer", "minimum": 0}},
                                "type": "object", "properties": {"x": {"$ref": "#/definitions/p"}},
                                "required": ["x"]}, '{"x":1}', '{"x":-1}'),
    ("recursive $ref to root", {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                                "required": ["next"]}, '{"next":{"next":null}}', '{"next":1}'),
    ("format: ipv4", {"type": "string", "format": "ipv4"}, '"10.0.0.1"', '"10.0.0.300"'),
    ("format: ipv6", {"type": "string", "format": "ipv6"}, '"fe80::1"', '"1::2::3"'),
    ("format + maxLength", {"type": "string", "format": "email", "maxLength": 12}, '"a@b.co"',
     '"abcdefghij@example.com"'),
    ("pattern + minLength", {"type": "string", "pattern": "^[a-z]+$", "minLength": 3}, '"abc"', '"ab"'),
    ("integer, fractional bounds", {"type": "integer", "minimum": 1.5, "maximum": 3.5}, "2", "1"),
    ("number, exclusive bounds", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, "0.5", "1"),
    ("prefixItems, items false", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                                  "items": False}, '[1,"a"]', '[1,"a",2]'),
    ("minContains", {"type": "array", "contains": {"type": "string"}, "minContains": 2, "maxItems": 3},
     '["a","b"]', '["a",1]'),
]

# --------------------------------------------------------------------------------------------- the tokenizer
def load_tokenizer(model: str):
    """The inferd tokenizer of a pulled model (store name or path); its `.backend` is a tokenizers.Tokenizer."""
    from inferd.engine.tokenizer import Tokenizer
    from inferd.store.pull import resolve_model

    resolved = resolve_model(model, auto_pull=False)
    return Tokenizer.from_pretrained(resolved.path)


def byte_level_vocab(tok) -> dict[bytes, list[int]]:
    """Token bytes -> ids, special tokens left out (outlines-core's Vocabulary wants decoded bytes)."""
    from inferd.engine.tokenizer import _byte_to_unicode

    unicode_to_byte = {c: b for b, c in _byte_to_unicode().items()}
    special_ids = set(tok.all_special_ids) | tok.eos_token_ids
    by_bytes: dict[bytes, list[int]] = {}
    for text, token_id in tok.backend.get_vocab(with_added_tokens=True).items():
        if token_id in special_ids:
            continue
        if all(c in unicode_to_byte for c in text):
            key = bytes(unicode_to_byte[c] for c in text)
        else:
            key = text.encode("utf-8")
        by_bytes.setdefault(key, []).append(token_id)
    return by_bytes


# ------------------------------------------------------------------------------------------------ backends
class Unsupported(Exception):
    """The backend has no API for this kind of constraint."""


class LLGuidance:
    name = "llguidance"

    def setup(self, tok) -> None:
        import llguidance
        import llguidance.torch  # noqa: F401  (the bitmask helpers)

        self.lib = llguidance
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                                eos_token=sorted(tok.eos_token_ids))
        self.executor = llguidance.LLExecutor()

    def fresh_compiler(self) -> None:
        return None  # no compiler object: every LLMatcher builds its own parser from the grammar text

    def compile(self, compiler, kind: str, spec):
        matcher_cls = self.lib.LLMatcher
        if kind == "json":
            grammar = matcher_cls.grammar_from_json_schema(spec)
        elif kind == "regex":
            grammar = matcher_cls.grammar_from_regex(spec)
        elif kind == "choice":
            grammar = matcher_cls.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        elif kind == "lark":
            grammar = matcher_cls.grammar_from_lark(spec)
        elif kind == "ebnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = matcher_cls.grammar_from_lark(gbnf_to_lark(spec))
        else:
            raise Unsupported(kind)
        matcher = matcher_cls(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher  # a template; requests get deep copies that share the compiled grammar

    def new_matchers(self, compiled, count: int) -> list:
        return [compiled.deep_copy() for _ in range(count)]

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            self.lib.torch.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            self.lib.torch.fill_next_token_bitmask_par(self.executor, list(zip(matchers, range(len(matchers)))),
                                                       bitmask)

    def rollback(self, matcher, num_tokens: int) -> None:
        if not matcher.rollback(num_tokens):
            raise RuntimeError(matcher.get_error())

    def accept(self, matchers, token_id: int) -> bool:
        if len(matchers) == 1:
            return matchers[0].consume_token(token_id)
        return all(self.executor.consume_token_par([(m, token_id) for m in matchers]))


class XGrammar:
    name = "xgrammar"

    def setup(self, tok) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.lib = xgrammar
        hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token)
        self.tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_token_ids))
        self.batch_matcher = xgrammar.BatchGrammarMatcher()

    def fresh_compiler(self):
        return self.lib.GrammarCompiler(self.tokenizer_info, cache_enabled=False)

    def compile(self, compiler, kind: str, spec):
        if kind == "json":
            return compiler.compile_json_schema(json.dumps(spec))
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))
        if kind == "lark":
            return compiler.compile_lark(spec)
        if kind == "ebnf":
            return compiler.compile_grammar(spec)
        raise Unsupported(kind)

    def new_matchers(self, compiled, count: int) -> list:
        return [self.lib.GrammarMatcher(compiled) for _ in range(count)]

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def rollback(self, matcher, num_tokens: int) -> None:
        matcher.rollback(num_tokens)

    def accept(self, matchers, token_id: int) -> bool:
        if len(matchers) == 1:
            return matchers[0].accept_token(token_id)
        return all(self.lib.BatchGrammarMatcher.batch_accept_token(matchers, [token_id] * len(matchers)))


class OutlinesCore:
    name = "outlines-core"

    def setup(self, tok) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.lib = outlines_core
        self.build_regex_from_schema = build_regex_from_schema
        self.vocabulary = outlines_core.Vocabulary(tok.eos_token_id, byte_level_vocab(tok))

    def fresh_compiler(self) -> None:
        return None  # every Index is built from scratch

    def compile(self, compiler, kind: str, spec):
        if kind == "json":
            regex = self.build_regex_from_schema(json.dumps(spec))
        elif kind == "regex":
            regex = spec
        elif kind == "choice":
            regex = "(" + "|".join(re.escape(c) for c in spec) + ")"
        else:
            raise Unsupported(f"{kind}: outlines-core takes only regexes and JSON schemas")
        return self.lib.Index(regex, self.vocabulary)

    def new_matchers(self, compiled, count: int) -> list:
        return [self.lib.Guide(compiled) for _ in range(count)]

    def fill(self, matchers, bitmask) -> None:
        row_numel = bitmask.shape[1]
        base = bitmask.data_ptr()
        for row, guide in enumerate(matchers):
            guide.write_mask_into(base + row * row_numel * 4, row_numel, 4)

    def rollback(self, matcher, num_tokens: int) -> None:
        matcher.rollback_state(num_tokens)

    def accept(self, matchers, token_id: int) -> bool:
        try:
            for guide in matchers:
                guide.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True


BACKENDS = [LLGuidance, XGrammar, OutlinesCore]


# ------------------------------------------------------------------------------------------------ measuring
def first_line(error: BaseException) -> str:
    # xgrammar prefixes its C++ errors with "[hh:mm:ss] /path/file.cc:line: ".
    text = re.sub(r"\[[0-9:]+\] \S+:[0-9]+: ", "", f"{type(error).__name__}: {error}".strip())
    return text.splitlines()[0][:200] if text else type(error).__name__


def is_allowed(bitmask, row: int, token_id: int) -> bool:
    word = int(bitmask[row, token_id // 32])
    return (word >> (token_id % 32)) & 1 == 1


def walk(backend, compiled, token_ids: list[int], eos_id: int, batch: int, width: int):
    """Fill masks before each token and EOS, accept each token, in `batch` matchers in lockstep.

    -> (mask ns per step, accept ns per step, matcher creation ns, None or why the walk stopped early)."""
    import torch

    bitmask = torch.full((batch, width), -1, dtype=torch.int32)
    t0 = time.perf_counter_ns()
    matchers = backend.new_matchers(compiled, batch)
    create_ns = time.perf_counter_ns() - t0
    mask_ns: list[int] = []
    accept_ns: list[int] = []
    for step, token_id in enumerate([*token_ids, eos_id]):
        t0 = time.perf_counter_ns()
        backend.fill(matchers, bitmask)
        mask_ns.append(time.perf_counter_ns() - t0)
        if not all(is_allowed(bitmask, row, token_id) for row in (0, batch - 1)):
            what = "EOS" if step == len(token_ids) else f"token {step} ({token_id})"
            return mask_ns, accept_ns, create_ns, f"mask forbids {what}"
        if step == len(token_ids):
            break
        t0 = time.perf_counter_ns()
        ok = backend.accept(matchers, token_id)
        accept_ns.append(time.perf_counter_ns() - t0)
        if not ok:
            return mask_ns, accept_ns, create_ns, f"accept refused token {step} ({token_id})"
    return mask_ns, accept_ns, create_ns, None


def cold_compile(backend, kind: str, spec, width: int):
    """-> (compile s, first mask s, compiled) on a fresh compiler; raises what the backend raises."""
    import torch

    compiler = backend.fresh_compiler()
    bitmask = torch.full((1, width), -1, dtype=torch.int32)
    gc.disable()  # a collection of the benchmark's own garbage would land in one backend's figure
    try:
        t0 = time.perf_counter()
        compiled = backend.compile(compiler, kind, spec)
        t1 = time.perf_counter()
        backend.fill(backend.new_matchers(compiled, 1), bitmask)
        t2 = time.perf_counter()
    finally:
        gc.enable()
    return t1 - t0, t2 - t1, compiled


def rollback_probe(backend, compiled, token_ids: list[int], num_back: int, width: int) -> str:
    """Speculative decoding's need: accept every token, roll back `num_back`, and the mask must equal the one seen
    `num_back` steps ago; accepting the same tokens again must work."""
    import torch

    masks = torch.empty((len(token_ids) + 1, width), dtype=torch.int32)
    (matcher,) = backend.new_matchers(compiled, 1)
    for step, token_id in enumerate(token_ids):
        backend.fill([matcher], masks[step : step + 1])
        if not backend.accept([matcher], token_id):
            return f"accept refused token {step}"
    try:
        backend.rollback(matcher, num_back)
    except Exception as error:  # noqa: BLE001
        return f"rollback failed: {first_line(error)[:60]}"
    again = torch.empty((1, width), dtype=torch.int32)
    backend.fill([matcher], again)
    if not torch.equal(again[0], masks[len(token_ids) - num_back]):
        return "mask after rollback differs"
    for token_id in token_ids[len(token_ids) - num_back :]:
        if not backend.accept([matcher], token_id):
            return "re-accept after rollback refused"
    return "ok"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def build_cases():
    from tests.structured_schemas import EXAMPLES, SCHEMA_MODELS

    cases = [(f"json:{m.__name__}", "json", m.model_json_schema(), EXAMPLES[m.__name__].model_dump_json())
             for m in SCHEMA_MODELS]
    cases += [
        ("regex:email", "regex", EMAIL_REGEX, "grace.hopper@example.com"),
        ("regex:date", "regex", DATE_REGEX, "2025-06-12"),
        ("choice:sentiment", "choice", CHOICES, "negative"),
        ("lark:arithmetic", "lark", LARK_GRAMMAR, "(12+3)*4-5/6"),
        ("ebnf:arithmetic", "ebnf", EBNF_GRAMMAR, "(12+3)*4-5/6"),
    ]
    return cases


def bench_apply(vocab_size: int, batch_sizes: list[int], use_torch_compile: bool, repeats: int) -> dict:
    """Microseconds to apply a [B, ceil(V/32)] int32 bitmask to [B, V] float32 logits, CPU, median of repeats."""
    import numpy as np
    import torch

    width = (vocab_size + 31) // 32
    shifts = torch.arange(32, dtype=torch.int32)  # [32] bit positions inside one int32 word

    def plain_shift_table(logits, mask):
        allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(mask.shape[0], -1)[:, : logits.shape[1]]
        logits.masked_fill_(allowed == 0, float("-inf"))

    def numpy_unpackbits(logits, mask):
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
        logits.masked_fill_(torch.from_numpy(bits) == 0, float("-inf"))

    # [256, 8] float32: the additive bias (0 or -inf) of the 8 tokens whose bits form byte value i; one
    # index_select turns the bitmask's bytes into a [B, V] bias, and add_ is a plain vectorised loop.
    bias_table = torch.where(((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))

    def plain_bias_table(logits, mask):
        byte_ids = mask.view(torch.uint8).view(-1).int()  # [B * V/8]
        bias = torch.index_select(bias_table, 0, byte_ids).view(mask.shape[0], -1)[:, : logits.shape[1]]
        logits.add_(bias)

    methods = {"torch shift table + masked_fill_ (plain)": plain_shift_table,
               "torch byte-to-bias table + add_ (plain)": plain_bias_table, "numpy unpackbits": numpy_unpackbits}
    try:
        import xgrammar

        methods["xgrammar CPU kernel"] = lambda logits, mask: xgrammar.apply_token_bitmask_inplace(logits, mask)
    except ImportError:
        pass
    if use_torch_compile:
        import llguidance.torch

        methods["llguidance.torch (torch.compile)"] = llguidance.torch.apply_token_bitmask_inplace
    results: dict = {"vocab_size": vocab_size, "methods": {}}
    generator = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        logits0 = torch.randn(batch, vocab_size, generator=generator)
        # ~1/8 of tokens allowed: a JSON string position allows thousands, a number position a few dozen.
        bits = torch.rand(batch, width * 32, generator=generator) < 0.125
        words = (bits.view(batch, width, 32).to(torch.int64) << torch.arange(32)).sum(-1)
        mask = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement
        reference = logits0.clone()
        reference[~bits[:, :vocab_size]] = float("-inf")
        forbidden = ~bits[:, :vocab_size].contiguous()
        # masked_fill_ alone, the mask already unpacked: what the masked_fill_ methods pay beyond unpacking.
        methods["masked_fill_ alone (bool mask ready)"] = lambda logits, mask: logits.masked_fill_(
            forbidden, float("-inf"))
        times: dict[str, list[int]] = {name: [] for name in methods}
        logits = logits0.clone()
        for name, method in methods.items():
            logits.copy_(logits0)
            t0 = time.perf_counter()
            method(logits, mask)
            entry = results["methods"].setdefault(name, {})
            entry[f"b{batch}_first_call_ms"] = (time.perf_counter() - t0) * 1e3
            if not torch.equal(logits, reference):
                raise AssertionError(f"{name} masks the wrong tokens")
        # Methods interleaved, so a noisy neighbour hits all of them alike.
        for _ in range(repeats if batch == 1 else max(1, repeats // 4)):
            for name, method in methods.items():
                logits.copy_(logits0)
                t0 = time.perf_counter_ns()
                method(logits, mask)
                times[name].append(time.perf_counter_ns() - t0)
        for name in methods:
            results["methods"][name][f"b{batch}_median_us"] = statistics.median(times[name]) / 1e3
    return results


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile"]
    return f"{model}; {os.cpu_count()} cpus; " + " ".join(f for f in wanted if f in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3, help="cold compiles per case and backend")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--only", default="", help="comma-separated case-name prefixes (e.g. json:Person,regex)")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip llguidance.torch's compiled apply")
    parser.add_argument("--json-out", default=str(REPO_ROOT / "out" / "grammar_backends.json"))
    args = parser.parse_args()

    import torch

    run_started = time.time()
    tok = load_tokenizer(args.model)
    eos_id = tok.eos_token_id
    width = (tok.vocab_size + 31) // 32
    print(f"model {args.model}: vocab {tok.vocab_size}, eos {eos_id}; {cpu_flags()}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load {os.getloadavg()[0]:.1f}", flush=True)

    backends = []
    setup: dict = {}
    for backend_cls in BACKENDS:
        backend = backend_cls()
        t0 = time.perf_counter()
        try:
            backend.setup(tok)
        except ImportError as error:
            print(f"{backend.name}: not installed ({first_line(error)}); skipped")
            continue
        setup_s = time.perf_counter() - t0
        # Setup again, imports now warm: the one-time cost per model a server pays.
        t0 = time.perf_counter()
        backend.setup(tok)
        setup[backend.name] = {"import_and_setup_s": setup_s, "tokenizer_setup_s": time.perf_counter() - t0}
        backends.append(backend)
    from importlib.metadata import version

    versions = {b.name: version(b.name.replace("-", "_")) for b in backends}

    cases = build_cases()
    if args.only:
        prefixes = tuple(args.only.split(","))
        cases = [c for c in cases if c[0].startswith(prefixes)]
    per_case: dict = {}
    steps: dict = {b.name: {"b1_mask": [], "b1_accept": [], "bN_mask": [], "bN_accept": [], "create_us": []}
                   for b in backends}
    for case_index, (case_name, kind, spec, text) in enumerate(cases):
        token_ids = tok.encode(text, add_special_tokens=False)
        rotation = case_index % len(backends)
        order = backends[rotation:] + backends[:rotation]
        results = {b.name: {"compile_s": [], "first_mask_s": []} for b in backends}
        compiled_by_backend = {}
        for _ in range(args.repeats):
            for backend in order:
                entry = results[backend.name]
                if "error" in entry:
                    continue
                try:
                    compile_s, first_mask_s, compiled = cold_compile(backend, kind, spec, width)
                except Unsupported as why:
                    entry["error"] = f"unsupported ({why})"
                    continue
                except Exception as error:  # noqa: BLE001 (coverage: any failure to compile is recorded)
                    entry["error"] = first_line(error)
                    continue
                entry["compile_s"].append(compile_s)
                entry["first_mask_s"].append(first_mask_s)
                compiled_by_backend[backend.name] = compiled
        for backend in order:
            entry = results[backend.name]
            if "error" in entry:
                continue
            compiled = compiled_by_backend[backend.name]
            for batch, key in ((1, "b1"), (args.batch, "bN")):
                mask_ns, accept_ns, create_ns, stopped = walk(backend, compiled, token_ids, eos_id, batch, width)
                if stopped:
                    entry.setdefault("walk_error", f"batch {batch}: {stopped}")
                    continue
                steps[backend.name][f"{key}_mask"] += mask_ns
                steps[backend.name][f"{key}_accept"] += accept_ns
                if batch == 1:
                    steps[backend.name]["create_us"].append(create_ns / 1e3)
                entry[f"{key}_mask_median_us"] = statistics.median(mask_ns) / 1e3
        line = [f"{case_name:24s} {len(token_ids):3d} tok"]
        for backend in backends:
            entry = results[backend.name]
            if "error" in entry:
                line.append(f"{backend.name}: {entry['error'][:60]}")
                continue
            entry["compile_ms"] = statistics.median(entry.pop("compile_s")) * 1e3
            entry["first_mask_ms"] = statistics.median(entry.pop("first_mask_s")) * 1e3
            line.append(f"{backend.name}: {entry['compile_ms']:.1f}+{entry['first_mask_ms']:.1f} ms"
                        + (f" WALK {entry['walk_error']}" if "walk_error" in entry else ""))
        print(" | ".join(line), flush=True)
        per_case[case_name] = {"kind": kind, "num_tokens": len(token_ids), "backends": results}

    # Enforcement: does the mask stop an instance that breaks one keyword?
    from tests.structured_schemas import SCHEMA_MODELS

    schemas = {m.__name__: m.model_json_schema() for m in SCHEMA_MODELS}
    # OpenAI's strict mode (and the openai client's `parse`) sends additionalProperties: false on every object.
    schemas["Sentiment:strict"] = {**schemas["Sentiment"], "additionalProperties": False}
    enforcement: dict = {b.name: {} for b in backends}
    for schema_name, invalid_text, keyword in INVALID_PROBES:
        token_ids = tok.encode(invalid_text, add_special_tokens=False)
        for backend in backends:
            try:
                compiled = backend.compile(backend.fresh_compiler(), "json", schemas[schema_name])
            except Exception as error:  # noqa: BLE001
                enforcement[backend.name][keyword] = f"no compile ({first_line(error)[:40]})"
                continue
            _, _, _, stopped = walk(backend, compiled, token_ids, eos_id, 1, width)
            enforcement[backend.name][keyword] = "enforced" if stopped else "NOT enforced"

    rollback: dict = {}
    order_schema = next(m for m in SCHEMA_MODELS if m.__name__ == "Order")
    from tests.structured_schemas import EXAMPLES

    order_ids = tok.encode(EXAMPLES["Order"].model_dump_json(), add_special_tokens=False)
    for backend in backends:
        compiled = backend.compile(backend.fresh_compiler(), "json", order_schema.model_json_schema())
        rollback[backend.name] = rollback_probe(backend, compiled, order_ids, 5, width)

    # Coverage beyond pydantic: compiles? accepts the valid instance? stops the invalid one?
    import jsonschema

    hand: dict = {b.name: {} for b in backends}
    for case_name, schema, valid_text, invalid_text in HAND_SCHEMAS:
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        assert validator.is_valid(json.loads(valid_text)), case_name
        assert not validator.is_valid(json.loads(invalid_text)), case_name
        for backend in backends:
            try:
                compiled = backend.compile(backend.fresh_compiler(), "json", schema)
            except Exception as error:  # noqa: BLE001
                hand[backend.name][case_name] = f"no compile: {first_line(error)[:70]}"
                continue
            verdicts = []
            for text, should_pass in ((valid_text, True), (invalid_text, False)):
                ids = tok.encode(text, add_special_tokens=False)
                _, _, _, stopped = walk(backend, compiled, ids, eos_id, 1, width)
                if should_pass and stopped:
                    verdicts.append("rejects valid")
                if not should_pass and not stopped:
                    verdicts.append("allows invalid")
            hand[backend.name][case_name] = ", ".join(verdicts) or "ok"

    print("\napplying the mask to [B, V] float32 logits (CPU):", flush=True)
    default_threads = torch.get_num_threads()
    apply_by_threads = {}
    for threads in sorted({1, default_threads}):
        # On a shared 2-core machine a multi-threaded torch op waits at its barrier for a descheduled thread.
        torch.set_num_threads(threads)
        apply_by_threads[threads] = bench_apply(tok.vocab_size, [1, args.batch], not args.no_torch_compile,
                                                repeats=200)
    torch.set_num_threads(default_threads)

    # ------------------------------------------------------------------------------------------- summary
    def med(values):
        return statistics.median(values) / 1e3 if values else float("nan")

    def p99(values):
        return percentile(values, 0.99) / 1e3 if values else float("nan")

    summary: dict = {}
    for backend in backends:
        name = backend.name
        json_cases = [c for c in per_case.values() if c["kind"] == "json"]
        compiled_json = [c["backends"][name] for c in json_cases if "error" not in c["backends"][name]]
        walked_json = [e for e in compiled_json if "walk_error" not in e]
        s = steps[name]
        summary[name] = {
            "version": versions[name],
            **{k: round(v, 3) for k, v in setup[name].items()},
            "json_schemas_compiled": len(compiled_json),
            "json_schemas_example_accepted": len(walked_json),
            "json_schemas_total": len(json_cases),
            "json_compile_ms_median": statistics.median([e["compile_ms"] for e in compiled_json]) if compiled_json
            else float("nan"),
            "json_compile_ms_max": max([e["compile_ms"] for e in compiled_json], default=float("nan")),
            "json_first_mask_ms_median": statistics.median([e["first_mask_ms"] for e in compiled_json])
            if compiled_json else float("nan"),
            "matcher_from_compiled_us_median": statistics.median(s["create_us"]) if s["create_us"] else float("nan"),
            "b1_mask_us_median": med(s["b1_mask"]), "b1_mask_us_p99": p99(s["b1_mask"]),
            "b1_accept_us_median": med(s["b1_accept"]),
            "bN_mask_us_median": med(s["bN_mask"]), "bN_mask_us_p99": p99(s["bN_mask"]),
            "bN_accept_us_median": med(s["bN_accept"]),
            "num_steps_b1": len(s["b1_mask"]),
            "failures": {case: e.get("error") or e.get("walk_error")
                         for case, c in per_case.items() for b, e in c["backends"].items()
                         if b == name and ("error" in e or "walk_error" in e)},
            "enforcement": enforcement[name],
            "hand_schemas": hand[name],
            "rollback_5_tokens": rollback[name],
        }

    names = [b.name for b in backends]
    n = args.batch
    rows = [
        ("version", lambda v: v["version"]),
        ("import + tokenizer setup, s (first)", lambda v: f"{v['import_and_setup_s']:.2f}"),
        ("tokenizer setup, s (imports warm)", lambda v: f"{v['tokenizer_setup_s']:.2f}"),
        ("JSON schemas compiled / example accepted (of %d)" % len(SCHEMA_MODELS),
         lambda v: f"{v['json_schemas_compiled']} / {v['json_schemas_example_accepted']}"),
        ("JSON compile, ms: median (max)",
         lambda v: f"{v['json_compile_ms_median']:.1f} ({v['json_compile_ms_max']:.0f})"),
        ("first mask after compile, ms (median)", lambda v: f"{v['json_first_mask_ms_median']:.2f}"),
        ("matcher from compiled grammar, us", lambda v: f"{v['matcher_from_compiled_us_median']:.0f}"),
        ("mask per step, batch 1, us: median / p99",
         lambda v: f"{v['b1_mask_us_median']:.0f} / {v['b1_mask_us_p99']:.0f}"),
        (f"mask per step, batch {n}, us: median / p99",
         lambda v: f"{v['bN_mask_us_median']:.0f} / {v['bN_mask_us_p99']:.0f}"),
        ("accept per step, batch 1 / %d, us" % n,
         lambda v: f"{v['b1_accept_us_median']:.0f} / {v['bN_accept_us_median']:.0f}"),
        ("keyword probes enforced (of %d)" % len(INVALID_PROBES),
         lambda v: str(sum(1 for r in v["enforcement"].values() if r == "enforced"))),
        ("roll back 5 tokens, same mask again (json:Order)", lambda v: v["rollback_5_tokens"]),
        ("hand-written schemas fully right (of %d)" % len(HAND_SCHEMAS),
         lambda v: str(sum(1 for r in v["hand_schemas"].values() if r == "ok"))),
        ("hand-written schemas refused at compile (of %d)" % len(HAND_SCHEMAS),
         lambda v: str(sum(1 for r in v["hand_schemas"].values() if r.startswith("no compile")))),
        ("hand-written schemas compiled but wrong (of %d)" % len(HAND_SCHEMAS),
         lambda v: str(sum(1 for r in v["hand_schemas"].values() if r != "ok" and not r.startswith("no compile")))),
    ]
    table = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, fmt in rows:
        table.append(f"| {label} | " + " | ".join(fmt(summary[name]) for name in names) + " |")
    enforcement_table = ["| keyword probe | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for _, _, keyword in INVALID_PROBES:
        enforcement_table.append(f"| {keyword} | " + " | ".join(enforcement[name][keyword] for name in names) + " |")
    hand_table = ["| JSON Schema beyond pydantic | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for case_name, *_ in HAND_SCHEMAS:
        hand_table.append(f"| {case_name} | " + " | ".join(hand[name][case_name] for name in names) + " |")
    other_table = ["| case | tokens | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]
    for case_name, case in per_case.items():
        if case["kind"] == "json":
            continue
        cells = []
        for name in names:
            e = case["backends"][name]
            if "error" in e:
                cells.append(e["error"][:50])
            else:
                cells.append(f"{e['compile_ms']:.1f} ms; {e.get('b1_mask_median_us', float('nan')):.0f} / "
                             f"{e.get('bN_mask_median_us', float('nan')):.0f} us"
                             + (f"; {e['walk_error']}" if "walk_error" in e else ""))
        other_table.append(f"| {case_name} | {case['num_tokens']} | " + " | ".join(cells) + " |")
    thread_counts = sorted(apply_by_threads)
    apply_table = ["| apply mask to [B, %d] float32, CPU, us (median) | " % tok.vocab_size
                   + " | ".join(f"batch 1, {t} thr | batch {n}, {t} thr" for t in thread_counts)
                   + " | first call, ms |", "|---|" + "---:|" * (2 * len(thread_counts) + 1)]
    for name in apply_by_threads[1]["methods"]:
        cells = []
        for t in thread_counts:
            e = apply_by_threads[t]["methods"][name]
            cells += [f"{e['b1_median_us']:.0f}", f"{e[f'b{n}_median_us']:.0f}"]
        first_ms = apply_by_threads[thread_counts[0]]["methods"][name]["b1_first_call_ms"]
        apply_table.append(f"| {name} | " + " | ".join(cells) + f" | {first_ms:.1f} |")

    print("\n" + "\n".join(table))
    print("\nregex, choice and grammar cases (compile; mask median batch 1 / batch %d):" % n)
    print("\n".join(other_table))
    print("\nenforcement probes (an invalid instance walked through the mask):")
    print("\n".join(enforcement_table))
    print("\nJSON Schema beyond pydantic (ok = compiles, accepts the valid instance, stops the invalid one):")
    print("\n".join(hand_table))
    print("\n" + "\n".join(apply_table))
    for name in names:
        for case, why in summary[name]["failures"].items():
            print(f"{name} failure: {case}: {why}")
    print(f"\ntotal {time.time() - run_started:.0f} s; load {os.getloadavg()[0]:.1f}")

    out = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(run_started)),
        "machine": {"cpu": cpu_flags(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "model": args.model, "vocab_size": tok.vocab_size, "batch": n, "repeats": args.repeats,
        "summary": summary, "cases": per_case, "apply_mask_by_torch_threads": apply_by_threads,
        "tables": {"summary": table, "other": other_table, "enforcement": enforcement_table, "hand_schemas": hand_table,
                   "apply": apply_table},
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
