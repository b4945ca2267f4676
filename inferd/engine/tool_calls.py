"""Tool calls in the model's text: the prompt that offers tools, the grammar that forces a call, and the parsers.

One format for now, the Hermes style that Qwen2.5, Hermes and many fine-tunes are trained on: each call is a JSON
object `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>` lines; results come back as
`tool` messages. A chat template that renders tools itself in this format (it mentions `<tool_call>`) gets the
tools and the conversation as transformers passes them (`tools=`, assistant `tool_calls` with arguments as
objects, `tool` messages). Any other template gets a system message describing the tools and the format, assistant
calls written back as the tagged text, and tool results as user messages in `<tool_response>` tags, so every
chat model can be offered tools (how well a model uses them is the model's business).

`tool_choice` "required" or a named function turns into a Lark grammar (llguidance's dialect, `%json` for each
tool's arguments schema), so the calls always parse; "auto" leaves the model free and the parser finds the calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the template writes tools and calls in the Hermes format itself."""
    return bool(chat_template) and TOOL_CALL_START in chat_template and "tools" in chat_template


def _function_schema(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_call_grammar(tools: Sequence[dict[str, Any]], *, allow_parallel: bool) -> str:
    """A Lark grammar whose sentences are one call (or several, one per line) to one of `tools` (OpenAI tool dicts),
    each call's arguments valid under that function's parameters schema."""
    schemas = [_function_schema(t) for t in tools]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call = f"call: {json.dumps(TOOL_CALL_START + chr(10))} %json {json.dumps(body)} {json.dumps(chr(10) + TOOL_CALL_END)}"
    start = 'start: call ("\\n" call)*' if allow_parallel else "start: call"
    return f"{start}\n{call}\n"


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    lines = [
        "You can call functions to answer. The functions you may call, each with a JSON Schema of its arguments:",
        "<tools>",
        *(json.dumps(t, ensure_ascii=False) for t in tools),
        "</tools>",
        "To call a function, answer with one block per call, exactly like this:",
        f'{TOOL_CALL_START}\n{{"name": "<function name>", "arguments": {{<the arguments as JSON>}}}}\n{TOOL_CALL_END}',
        "The results come back inside <tool_response></tool_response>.",
    ]
    return "\n".join(lines)


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def conversation_for_template(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None, *, template_renders: bool
) -> list[dict[str, Any]]:
    """OpenAI chat messages (dicts: role, content, tool_calls, tool_call_id, name) -> what the chat template gets.

    With `template_renders`, transformers' semantics: assistant tool_calls keep their structure with arguments as
    objects. Otherwise calls and results become text in the Hermes format, and the tools a system message."""
    result: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        content = message.get("content") or ""
        calls = message.get("tool_calls") or []
        if template_renders:
            entry = {k: v for k, v in message.items() if v is not None}
            entry["content"] = content
            if calls:
                entry["tool_calls"] = [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["function"]["name"], "arguments": _arguments_object(c["function"]["arguments"])}}
                    for c in calls
                ]
            result.append(entry)
            continue
        if role == "assistant" and calls:
            blocks = [
                f'{TOOL_CALL_START}\n{json.dumps({"name": c["function"]["name"], "arguments": _arguments_object(c["function"]["arguments"])}, ensure_ascii=False)}\n{TOOL_CALL_END}'
                for c in calls
            ]
            text = "\n".join(([content] if content else []) + blocks)
            result.append({"role": "assistant", "content": text})
        elif role == "tool":
            result.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            entry = {"role": role, "content": content}
            if message.get("name") is not None:
                entry["name"] = message["name"]
            result.append(entry)
    if tools and not template_renders:
        prompt = tools_system_prompt(tools)
        if result and result[0]["role"] in ("system", "developer"):
            result[0] = {**result[0], "content": f"{result[0]['content']}\n\n{prompt}" if result[0]["content"] else prompt}
        else:
            result.insert(0, {"role": "system", "content": prompt})
    return result


def _parse_call(block: str) -> ParsedToolCall | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        return ParsedToolCall(value["name"], arguments)
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """The answer's text outside the calls (stripped; None when empty) and its calls, in order. A block that is not
    a call (not JSON, no name) stays in the text."""
    calls: list[ParsedToolCall] = []
    content_parts: list[str] = []
    position = 0
    for match in _BLOCK.finditer(text):
        call = _parse_call(match.group(1).strip())
        if call is None:
            continue
        content_parts.append(text[position : match.start()])
        calls.append(call)
        position = match.end()
    content_parts.append(text[position:])
    content = "".join(content_parts).strip()
    return (content or None), calls


class StreamingToolCallParser:
    """Turns a stream of text deltas into OpenAI chat deltas: `content` for text outside calls (a possible start of
    `<tool_call>` is held back until it is decided) and `tool_calls` entries when a call's block closes: one
    entry with id, type and name (arguments "") and one with the arguments, as OpenAI streams them."""

    def __init__(self) -> None:
        self._buffer = ""  # text not yet decided (a possible call start, an open call block)
        self._pending_whitespace = ""  # trailing whitespace of the content so far: emitted only if text follows
        self._has_content = False
        self._num_calls = 0
        self.calls: list[ParsedToolCall] = []

    def _content(self, pieces: list[str]) -> str:
        """Content as parse_tool_calls gives it (the text outside calls, stripped), spread over the deltas."""
        text = "".join(pieces)
        if not self._has_content:
            text = text.lstrip()
        text = self._pending_whitespace + text
        stripped = text.rstrip()
        self._pending_whitespace = text[len(stripped):]
        if stripped:
            self._has_content = True
        return stripped

    def feed(self, delta: str, *, is_final: bool = False) -> dict[str, Any]:
        """-> a delta dict with `content` and/or `tool_calls` (empty when nothing is decided yet)."""
        self._buffer += delta
        content: list[str] = []
        tool_deltas: list[dict[str, Any]] = []
        while self._buffer:
            start = self._buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = 0 if is_final else _partial_suffix_length(self._buffer, TOOL_CALL_START)
                content.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            if start > 0:
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
            end = self._buffer.find(TOOL_CALL_END)
            if end < 0:
                if is_final:  # an unclosed block at the end is text
                    content.append(self._buffer)
                    self._buffer = ""
                break
            block = self._buffer[len(TOOL_CALL_START) : end]
            self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
            call = _parse_call(block.strip())
            if call is None:
                content.append(TOOL_CALL_START + block + TOOL_CALL_END)
                continue
            index = self._num_calls
            self._num_calls += 1
            self.calls.append(call)
            tool_deltas.append({"index": index, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}})
            tool_deltas.append({"index": index, "function": {"arguments": call.arguments}})
        result: dict[str, Any] = {}
        text = self._content(content)
        if text:
            result["content"] = text
        if tool_deltas:
            result["tool_calls"] = tool_deltas
        return result


def _partial_suffix_length(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
