"""A reader for protobuf text format, enough for Triton's config.pbtxt (no protobuf schema needed).

    name: "fraud"                      -> {"name": ["fraud"]}
    input [ { name: "x" dims: [ 12 ] } ] -> {"input": [{"name": ["x"], "dims": [12]}]}
    dynamic_batching { }               -> {"dynamic_batching": [{}]}

Every field maps to a list of its values (repeated fields and `[...]` lists merge); messages are dicts;
numbers are int or float; enum names and true/false stay strings. `#` starts a comment.
"""

from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?[fF]?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<punct>[{}\[\]:,;<>])
    )""",
    re.VERBOSE,
)


class PbtxtError(ValueError):
    pass


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            line = text.count("\n", 0, pos) + 1
            raise PbtxtError(f"line {line}: cannot read {text[pos:pos + 20].strip()!r}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "comment":
            tokens.append((kind, match.group(kind), text.count("\n", 0, match.start(kind)) + 1))
    return tokens


def _unquote(token: str) -> str:
    body = token[1:-1]
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in body else body


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def next(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise PbtxtError("unexpected end of text")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        kind, text, line = self.next()
        if text != value:
            raise PbtxtError(f"line {line}: expected {value!r}, got {text!r}")

    def message(self, closing: str | None) -> dict[str, list[Any]]:
        fields: dict[str, list[Any]] = {}
        while True:
            token = self.peek()
            if token is None:
                if closing is not None:
                    raise PbtxtError(f"unexpected end of text: missing {closing!r}")
                return fields
            kind, text, line = token
            if closing is not None and text == closing:
                self.pos += 1
                return fields
            if text in (",", ";"):
                self.pos += 1
                continue
            if kind != "ident":
                raise PbtxtError(f"line {line}: expected a field name, got {text!r}")
            self.pos += 1
            has_colon = self.peek() is not None and self.peek()[1] == ":"  # type: ignore[index]
            if has_colon:
                self.pos += 1
            fields.setdefault(text, []).extend(self.values(text, line))

    def values(self, field_name: str, line: int) -> list[Any]:
        token = self.peek()
        if token is None:
            raise PbtxtError(f"line {line}: field {field_name!r} has no value")
        if token[1] == "[":
            self.pos += 1
            items: list[Any] = []
            while True:
                token = self.peek()
                if token is None:
                    raise PbtxtError(f"line {line}: missing ']' for field {field_name!r}")
                if token[1] == "]":
                    self.pos += 1
                    return items
                if token[1] == ",":
                    self.pos += 1
                    continue
                items.append(self.value(field_name))
        return [self.value(field_name)]

    def value(self, field_name: str) -> Any:
        kind, text, line = self.next()
        if text in ("{", "<"):
            return self.message("}" if text == "{" else ">")
        if kind == "string":
            return _unquote(text)
        if kind == "number":
            stripped = text.rstrip("fF")
            return float(stripped) if any(c in stripped for c in ".eE") else int(stripped)
        if kind == "ident":
            return text
        raise PbtxtError(f"line {line}: field {field_name!r} has an unexpected value {text!r}")


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    return _Parser(text).message(None)
