"""Constrained decoding in the engine (inferd/structured, the sampler's bitmask, the runner, the engine's stop).

References: the unconstrained greedy run of the same model (a constraint its answer already satisfies must not
change a token), the JSON parser and the schema (every constrained answer parses and validates), llguidance's own
matcher (the bitmask unpack agrees bit for bit), and the speculative-off run (spec decoding under a grammar gives
the same tokens).
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from inferd.engine.llm import LLM
from inferd.engine.tool_calls import (
    StreamingToolCallParser,
    conversation_for_template,
    parse_tool_calls,
    tool_call_grammar,
)
from inferd.errors import InvalidParameterError
from inferd.layers.sampler import token_bitmask_to_additive
from inferd.request import SamplingParams, StructuredOutputsParams
from inferd.structured import GrammarCompiler

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "languages": {"type": "array", "items": {"type": "string", "enum": ["en", "fr", "de"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(default_gguf_path) -> LLM:
    # The GGUF's blocks with float activations (before int8 activations became `auto`): the engine tests below need
    # greedy answers that end in EOS within 40 tokens, and under int8 activations "What is the capital of France?"
    # loops past that. spec_llm takes the same scheme, since its outputs are compared with these.
    return LLM(model=str(default_gguf_path), kv_cache_memory="128MiB", max_model_len=1024, speculative="off",
               quantization="gguf")


@pytest.fixture(scope="module")
def spec_llm(default_gguf_path) -> LLM:
    return LLM(model=str(default_gguf_path), kv_cache_memory="128MiB", max_model_len=1024, speculative="ngram",
               quantization="gguf")


def chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}])


def greedy(llm: LLM, prompts, constraint: StructuredOutputsParams | None = None, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=kwargs.pop("max_tokens", 48), structured_outputs=constraint,
                            **kwargs)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


# ---------------------------------------------------------------------------------------------- units


def test_bitmask_unpack_matches_llguidance_bits(default_tokenizer):
    compiler = GrammarCompiler(lambda: default_tokenizer.backend.to_str(), 49152, default_tokenizer.eos_token_ids)
    matcher = compiler.compile(StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA))).new_matcher()
    bitmask = torch.empty(1, (49152 + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    additive = token_bitmask_to_additive(bitmask, 49152)[0]
    allowed_by_unpack = {t for t in range(49152) if additive[t] == 0.0}
    # llguidance itself decides token by token: a token is allowed iff it can be consumed here.
    sample = random.Random(0).sample(range(49152), 3000) + sorted(allowed_by_unpack)
    for token_id in sample:
        assert (matcher.num_valid_tokens([token_id]) == 1) == (token_id in allowed_by_unpack), token_id
    assert allowed_by_unpack and all(default_tokenizer.decode([t]).lstrip().startswith("{") for t in allowed_by_unpack)
    # Past the last word, nothing is allowed; bits beyond V are cut.
    assert torch.isinf(token_bitmask_to_additive(bitmask[:, :10], 400)[0, 320:]).all()


def test_compiler_caches_and_names_the_field(default_tokenizer):
    compiler = GrammarCompiler(lambda: default_tokenizer.backend.to_str(), 49152, default_tokenizer.eos_token_ids)
    params = StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA), source="response_format.json_schema.schema")
    first = compiler.compile(params)
    again = compiler.compile(StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA)))
    assert again is first and compiler.num_compiles == 1 and compiler.num_cache_hits == 1
    cases = [
        (StructuredOutputsParams(json='{"type": "strin"}', source="response_format.json_schema.schema"),
         "response_format", "strin"),
        (StructuredOutputsParams(json='{"type": "array", "uniqueItems": true}', source="structured_outputs.json"),
         "structured_outputs", "uniqueItems"),
        (StructuredOutputsParams(regex="(?=a)b", source="structured_outputs.regex"), "structured_outputs", "look"),
        (StructuredOutputsParams(grammar="start: missing_rule", source="tools[3].function.parameters"), "tools", "missing_rule"),
    ]
    for bad, param, detail in cases:
        with pytest.raises(InvalidParameterError) as info:
            compiler.compile(bad)
        assert info.value.param == param and detail in str(info.value) and str(info.value).startswith(bad.source)
    with pytest.raises(InvalidParameterError):
        StructuredOutputsParams(json="{}", regex="a")  # exactly one form


def test_tool_call_parser_stream_equals_whole():
    texts = [
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
        "no calls here <tool at all  ",
        "<tool_call>\nnot json\n</tool_call> x",
        '  hi\n\n<tool_call>{"name":"a","arguments":{"x":[1,2]}}</tool_call>\n\nbye  ',
        '<tool_call>\n{"name": "a", "arguments": {',  # cut by max_tokens: stays text
        '<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>',  # arguments as a JSON string
    ]
    expected = [
        ("Sure.", [("get_weather", '{"city": "Paris"}'), ("f", "{}")]),
        ("no calls here <tool at all", []),
        ("<tool_call>\nnot json\n</tool_call> x", []),
        ("hi\n\n\n\nbye", [("a", '{"x": [1, 2]}')]),
        ('<tool_call>\n{"name": "a", "arguments": {', []),
        (None, [("s", '{"q": 1}')]),
    ]
    rng = random.Random(0)
    for text, (want_content, want_calls) in zip(texts, expected):
        content, calls = parse_tool_calls(text)
        assert (content, [(c.name, c.arguments) for c in calls]) == (want_content, want_calls)
        for _ in range(25):  # any split into deltas assembles to the same answer
            cuts = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1)))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            parser = StreamingToolCallParser()
            streamed_content = ""
            streamed: dict[int, list[str]] = {}
            for k, piece in enumerate(pieces):
                delta = parser.feed(piece, is_final=k == len(pieces) - 1)
                streamed_content += delta.get("content", "")
                for entry in delta.get("tool_calls", []):
                    name_args = streamed.setdefault(entry["index"], ["", ""])
                    name_args[0] += entry["function"].get("name", "")
                    name_args[1] += entry["function"].get("arguments", "")
            assert (streamed_content or None) == want_content
            assert [tuple(streamed[i]) for i in sorted(streamed)] == want_calls


def test_conversation_without_tool_template_becomes_text():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call_1"},
    ]
    converted = conversation_for_template(messages, tools, template_renders=False)
    assert converted[0]["role"] == "system" and '"get_weather"' in converted[0]["content"]
    assert parse_tool_calls(converted[2]["content"])[1][0].arguments == '{"city": "Paris"}'
    assert converted[3] == {"role": "user", "content": '<tool_response>\n{"temp": 18}\n</tool_response>'}
    native = conversation_for_template(messages, tools, template_renders=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # transformers' semantics
    assert native[2]["tool_call_id"] == "call_1"


# ---------------------------------------------------------------------------------------------- engine


def test_constraint_the_answer_already_meets_changes_no_token(llm):
    """Greedy under a constraint equals the unconstrained greedy answer whenever that answer satisfies it."""
    asks = ["Is the sky blue? Answer yes or no.", "Name one primary color.", "What is 2 + 2?",
            "What is the capital of France?"]
    prompts = [chat_ids(llm, a) for a in asks]
    free = greedy(llm, prompts, max_tokens=40)
    eos = llm.engine.eos_token_ids
    for prompt, answer in zip(prompts, free):
        assert answer.finish_reason == "stop", answer.text  # the whole answer, ending in EOS
        body_ids = [t for t in answer.token_ids if t not in eos]
        constraints = [
            StructuredOutputsParams(choice=(answer.text, answer.text + " Maybe", "something else")),
            StructuredOutputsParams(grammar="start: /(.|\\n)*/"),
            StructuredOutputsParams(regex="[\\s\\S]*"),
        ]
        for constraint in constraints:
            [constrained] = greedy(llm, [prompt], constraint, max_tokens=40)
            assert constrained.text == answer.text, constraint
            assert [t for t in constrained.token_ids if t not in eos] == body_ids


def test_json_schema_answers_parse_and_validate(llm):
    constraint = StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA))
    asks = ["Describe Alice, 31, who speaks French, as JSON.", "Give me a JSON record for a person.",
            "Tell me a joke.", "List three fruits."]
    answers = greedy(llm, [chat_ids(llm, a) for a in asks], constraint, max_tokens=120)
    for answer in answers:
        assert answer.finish_reason == "stop", answer.text  # ended by the grammar, not cut by max_tokens
        jsonschema.validate(json.loads(answer.text), PERSON_SCHEMA)
    # Random sampling with n > 1: every sample is valid too, and the grammar keeps each sequence apart.
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=120, structured_outputs=constraint)
    [output] = llm.generate([chat_ids(llm, asks[0])], params)
    for sample in output.outputs:
        if sample.finish_reason == "stop":
            jsonschema.validate(json.loads(sample.text), PERSON_SCHEMA)
    assert sum(s.finish_reason == "stop" for s in output.outputs) >= 2


def test_json_object_and_choice_and_regex(llm):
    [obj] = greedy(llm, [chat_ids(llm, "Tell me about Paris.")], StructuredOutputsParams(json_object=True),
                   max_tokens=200)
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    else:  # cut by max_tokens: still a prefix the grammar accepts, starting an object
        assert obj.text.lstrip().startswith("{")
    [label] = greedy(llm, [chat_ids(llm, "Is this review positive? 'I loved it.'")],
                     StructuredOutputsParams(choice=("positive", "negative", "neutral")))
    assert label.text in ("positive", "negative", "neutral") and label.finish_reason == "stop"
    [date] = greedy(llm, [llm.tokenizer.encode("The date today is")],
                    StructuredOutputsParams(regex=" [0-9]{4}-[0-9]{2}-[0-9]{2}"))
    import re

    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", date.text) and date.finish_reason == "stop"


def test_forced_tool_call_always_parses(llm):
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": False}}},
    ]
    constraint = StructuredOutputsParams(grammar=tool_call_grammar(tools, allow_parallel=False), source="tools")
    asks = ["What's the weather in Paris?", "What is 2 plus 3?", "Hello!"]
    conversations = [conversation_for_template([{"role": "user", "content": a}], tools, template_renders=False)
                     for a in asks]
    prompts = [llm.tokenizer.encode_chat(c) for c in conversations]
    for answer in greedy(llm, prompts, constraint, max_tokens=80):
        assert answer.finish_reason == "stop", answer.text
        content, calls = parse_tool_calls(answer.text)
        assert content is None and len(calls) == 1
        arguments = json.loads(calls[0].arguments)
        if calls[0].name == "add":
            assert set(arguments) == {"a", "b"} and all(isinstance(v, int) for v in arguments.values())
        else:
            assert calls[0].name == "get_weather" and arguments["unit"] in ("celsius", "fahrenheit")


def test_speculative_decoding_under_a_grammar_is_lossless(llm, spec_llm):
    """n-gram proposals are verified against the grammar's masks: same tokens as without speculation, and the
    proposals really ran (some accepted, some rejected by the grammar or the model)."""
    record = '{"name": "Ada Lovelace", "age": 36, "languages": ["en", "fr"]}'
    asks = [f"Copy this JSON exactly: {record}", f"Repeat this record twice: {record} {record}",
            "Describe Bob, 40, who speaks German, as JSON."]
    prompts = [chat_ids(llm, a) for a in asks]
    constraint = StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA))
    reference = greedy(llm, prompts, constraint, max_tokens=60)
    stats0 = spec_llm.engine.get_stats()
    alone = [greedy(spec_llm, [p], constraint, max_tokens=60)[0] for p in prompts]
    batch = greedy(spec_llm, prompts, constraint, max_tokens=60)
    stats1 = spec_llm.engine.get_stats()
    for ref, one, many in zip(reference, alone, batch):
        assert one.token_ids == ref.token_ids and many.token_ids == ref.token_ids
    assert stats1.num_spec_accepted_tokens > stats0.num_spec_accepted_tokens
    spec_llm.engine.kv_manager.check_integrity()
