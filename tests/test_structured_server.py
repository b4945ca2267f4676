"""Structured output and tool calling over HTTP: the official `openai` client against a real `inferd serve`.

References: pydantic (the client's `parse` validates each answer against the model it sent), the non-streamed
answer (a streamed tool call assembles to the same call), and the request's own fields (errors name them).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from structured_schemas import PROMPTS, SCHEMA_MODELS

# The longest complete answer of the default model to these schemas is ~105 tokens; a few schemas send the 135M model
# into a loop the grammar allows (digits of a number, a recursive child, one emoji repeated) until this cut.
MAX_TOKENS = 160
MIN_VALID_SCHEMAS = 20  # issue 12's floor; the default model completes 25 of the 30 (greedy)
NUM_CLIENT_THREADS = 8  # requests in flight at once: constrained rows share batches


@pytest.fixture(scope="module")
def client(inferd_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{inferd_server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def _messages(model_class) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[model_class.__name__] + " Answer in JSON."}]


def test_parse_gives_a_valid_object_for_every_schema(client, inferd_server):
    def ask(model_class):
        try:
            completion = client.chat.completions.parse(
                model=inferd_server.model_name, messages=_messages(model_class), response_format=model_class,
                temperature=0, max_tokens=MAX_TOKENS)
        except openai.LengthFinishReasonError:
            return "length", None
        choice = completion.choices[0]
        return choice.finish_reason, choice.message.parsed

    def ask_streaming(model_class):
        try:
            with client.chat.completions.stream(
                model=inferd_server.model_name, messages=_messages(model_class), response_format=model_class,
                temperature=0, max_tokens=MAX_TOKENS,
            ) as stream:
                for _ in stream:
                    pass
                completion = stream.get_final_completion()
        except openai.LengthFinishReasonError:
            return "length", None
        choice = completion.choices[0]
        return choice.finish_reason, choice.message.parsed

    with ThreadPoolExecutor(NUM_CLIENT_THREADS) as pool:
        answers = list(pool.map(ask, SCHEMA_MODELS))
        streamed = list(pool.map(ask_streaming, SCHEMA_MODELS))
    assert len(SCHEMA_MODELS) >= 20
    num_valid = 0
    for model_class, (reason, parsed), (stream_reason, stream_parsed) in zip(SCHEMA_MODELS, answers, streamed):
        assert (reason, parsed == stream_parsed) == (stream_reason, True), model_class.__name__  # greedy: same answer
        if reason == "stop":  # the grammar ended it: the client parsed and validated it with pydantic
            assert isinstance(parsed, model_class) and isinstance(stream_parsed, model_class), model_class.__name__
            num_valid += 1
        else:
            assert reason == "length", model_class.__name__
    assert num_valid >= MIN_VALID_SCHEMAS, f"only {num_valid} of {len(SCHEMA_MODELS)} schemas gave a complete answer"


def test_structured_outputs_extras_and_completions(client, inferd_server):
    model = inferd_server.model_name
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert answer.choices[0].message.content in ("yes", "no", "maybe")
    completion = client.completions.create(
        model=model, prompt="The meeting is on", temperature=0, max_tokens=20,
        extra_body={"structured_outputs": {"regex": " [0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    import re

    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", completion.choices[0].text)
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 6 times 7?"}], temperature=0, max_tokens=20,
        extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"The answer is [0-9]+\.", answer.choices[0].message.content)
    gbnf = 'root ::= "Yes" | "No"'
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Is water wet?"}], temperature=0, max_tokens=5,
        extra_body={"structured_outputs": {"grammar": gbnf}})
    assert answer.choices[0].message.content in ("Yes", "No")
    obj = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object about a cat."}], temperature=0,
        max_tokens=MAX_TOKENS, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}, "required": ["timezone"],
    "additionalProperties": False}}}


def test_tool_call_round_trip_and_streamed_deltas(client, inferd_server):
    model = inferd_server.model_name
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice="required", temperature=0, max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    if call.function.name == "get_weather":
        assert arguments["unit"] in ("celsius", "fahrenheit") and isinstance(arguments["city"], str)

    # The same request streamed: the deltas assemble to the same call (ids aside).
    stream = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice="required", temperature=0, max_tokens=120, stream=True)
    assembled: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = assembled.setdefault(delta.index, {"name": "", "arguments": "", "id": ""})
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function.name or "") if delta.function else ""
            entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
        if chunk.choices[0].finish_reason:
            finish_reasons.append(chunk.choices[0].finish_reason)
    assert finish_reasons == ["tool_calls"]
    assert [(e["name"], e["arguments"]) for _, e in sorted(assembled.items())] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert all(e["id"].startswith("call_") for e in assembled.values())

    # Second turn: the assistant's call and the tool's result go back in; the model answers (text or a call).
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})})
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                            temperature=0, max_tokens=60)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls

    # A named function: exactly that call, finish_reason "stop" as OpenAI gives for a forced function.
    named = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=80)
    assert named.choices[0].finish_reason == "stop"
    [named_call] = named.choices[0].message.tool_calls
    assert named_call.function.name == "get_time" and "timezone" in json.loads(named_call.function.arguments)
    # tool_choice none: plain text, no calls parsed.
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                           tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=20)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format", "strin"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}},
         "response_format", "uniqueItems"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
          "tool_choice": "required"}, "tools", "tools[0].function.parameters"),
        ({"structured_outputs": {"regex": "(?=a)b"}}, "structured_outputs", "look"),
        ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs", "missing"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
         "structured_outputs", "not both"),
        ({"messages": [{"role": "tool", "content": "18C"}]}, "messages", "tool_call_id"),
    ],
)
def test_bad_constraints_are_400_naming_the_field(inferd_server, body, param, fragment):
    payload = {"model": inferd_server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
               **body}
    response = httpx.post(f"{inferd_server.base_url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert httpx.get(f"{inferd_server.base_url}/health", timeout=10).status_code == 200
