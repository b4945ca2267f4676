"""Chat templates: find a model's Jinja template and render it the way Hugging Face transformers does.

A template renders `messages` (a list of {"role", "content", ...} dicts) into the prompt string the model was
trained on. The rendering environment matches transformers' `apply_chat_template(..., tokenize=False)`:
a sandboxed, immutable Jinja environment with trim_blocks + lstrip_blocks, the `loopcontrols` and `generation`
extensions, `raise_exception`, `strftime_now`, a `tojson` filter that does not HTML-escape, and the special
tokens (`bos_token`, `eos_token`, ...) as variables. The same template therefore yields the same prompt here and
in transformers, byte for byte.

Where a template comes from:
  GGUF file        metadata `tokenizer.chat_template` (and `tokenizer.chat_template.<name>` for named ones)
  HF directory     `chat_template.jinja` (+ `additional_chat_templates/<name>.jinja`), which take priority over
                   the `chat_template` entry of tokenizer_config.json (a string, or a list of
                   {"name", "template"} dicts)
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE_NAME = "default"
TOOL_USE_TEMPLATE_NAME = "tool_use"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADDITIONAL_CHAT_TEMPLATES_DIR = "additional_chat_templates"

# Names under which a message's reasoning may arrive; templates read "reasoning_content" (gpt-oss reads "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# A template is str for a single one, or {name: source} for a model shipping several.
ChatTemplates = str | dict[str, str]


class ChatTemplateError(ValueError):
    """The model has no usable chat template, or rendering it failed (including `raise_exception` calls)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _SafeDict:
    """`dict(...)` inside templates, without exposing the type object itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attribute names (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- Jinja's own signature trick: self may be a kwarg
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and ' -- wrong inside a prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from e


def _plain_data(value: Any) -> Any:
    """Rebuild caller data out of plain JSON types so the sandbox only ever sees str/int/float/bool/list/dict."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_data(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. our OpenAI request messages
        return _plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: list[Any]) -> list[dict]:
    normalized = []
    for message in messages:
        if callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}: {message!r}")
        # OpenAI clients send content=None / tool_calls=None; templates treat a missing key correctly, None not.
        message = {key: value for key, value in message.items() if value is not None}
        message = _plain_data(message)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


def select_chat_template(templates: ChatTemplates | None, *, has_tools: bool = False) -> str:
    """The template source to render: the only one, or "tool_use" when tools are given, else "default"."""
    if templates is None:
        raise ChatTemplateError(
            "this model has no chat template (no GGUF tokenizer.chat_template, no chat_template.jinja, no "
            "chat_template in tokenizer_config.json); use the completions endpoint with a raw prompt instead"
        )
    if isinstance(templates, str):
        return templates
    if has_tools and TOOL_USE_TEMPLATE_NAME in templates:
        return templates[TOOL_USE_TEMPLATE_NAME]
    if DEFAULT_TEMPLATE_NAME in templates:
        return templates[DEFAULT_TEMPLATE_NAME]
    raise ChatTemplateError(
        f"this model has several chat templates and none is named {DEFAULT_TEMPLATE_NAME!r}: {sorted(templates)}"
    )


def render_chat_template(
    source: str,
    messages: list[Any],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with the template `source`.

    `special_tokens` maps names like "bos_token" to token strings; extra `kwargs` (e.g. enable_thinking) are
    template variables and override the special tokens, as in transformers.
    """
    template = compile_chat_template(source)
    variables = {**dict(special_tokens or {}), **_plain_data(kwargs)}
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping) and not callable(getattr(tool, "model_dump", None)):
                raise ChatTemplateError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
    try:
        return template.render(
            messages=_normalize_messages(messages),
            tools=_plain_data(tools),
            documents=_plain_data(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


def read_hf_chat_templates(model_dir: str | Path, tokenizer_config: Mapping[str, Any]) -> ChatTemplates | None:
    """The chat template(s) of a Hugging Face directory, or None when it has none."""
    model_dir = Path(model_dir)
    from_files: dict[str, str] = {}
    default_file = model_dir / CHAT_TEMPLATE_FILE
    if default_file.is_file():
        from_files[DEFAULT_TEMPLATE_NAME] = default_file.read_text(encoding="utf-8")
    extra_dir = model_dir / ADDITIONAL_CHAT_TEMPLATES_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            from_files[path.stem] = path.read_text(encoding="utf-8")
    if from_files:
        return _collapse(from_files)

    entry = tokenizer_config.get("chat_template")
    if entry is None:
        legacy_file = model_dir / "chat_template.json"  # written by processors of older transformers
        if legacy_file.is_file():
            entry = json.loads(legacy_file.read_text(encoding="utf-8")).get("chat_template")
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, list):
        return _collapse({item["name"]: item["template"] for item in entry})
    if isinstance(entry, dict):
        return _collapse(dict(entry))
    raise ChatTemplateError(f"unreadable chat_template entry in tokenizer_config.json: {type(entry).__name__}")


def read_gguf_chat_templates(metadata: Mapping[str, Any]) -> ChatTemplates | None:
    """The chat template(s) in GGUF metadata (already decoded to Python values)."""
    templates: dict[str, str] = {}
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        templates[DEFAULT_TEMPLATE_NAME] = metadata["tokenizer.chat_template"]
    prefix = "tokenizer.chat_template."
    for key, value in metadata.items():
        if key.startswith(prefix) and isinstance(value, str):
            templates[key[len(prefix) :]] = value
    return _collapse(templates) if templates else None


def _collapse(templates: dict[str, str]) -> ChatTemplates:
    if list(templates) == [DEFAULT_TEMPLATE_NAME]:
        return templates[DEFAULT_TEMPLATE_NAME]
    return templates
