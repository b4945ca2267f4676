"""Layer 5: request and response bodies of the HTTP API (OpenAI's schema plus vLLM-style extras).

Scalars are strict (no "5" for 5, no true for 1), as OpenAI's API is; range checks that SamplingParams also
makes are repeated here only where the request's name differs from SamplingParams' or a bound keeps a value
away from the engine (seed must fit int64).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from inferd.request import MAX_LOGPROBS, MAX_N

Float = Annotated[float, Field(strict=True)]  # strict float still takes a JSON integer
Int64 = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
TokenId = Annotated[int, Field(strict=True, ge=0)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send fields a server may not know (metadata, store, ...).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class TextContentPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ToolCallFunction(_Body):
    name: StrictStr
    arguments: StrictStr = Field(description="The arguments as a JSON text, as the model wrote them.")


class ToolCall(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made.")
    tool_call_id: StrictStr | None = Field(None, description="tool: the call this message answers.")

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> "ChatMessage":
        # Only an assistant turn (one that called tools) may come without content, as in OpenAI's API.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StructuredOutputsRequest(_Body):
    """vLLM's `structured_outputs`: constrain the output to exactly one of these."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | StrictStr | None = Field(None, alias="json", description="A JSON Schema.")
    json_object: StrictBool | None = Field(None, description="true: any JSON object.")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = Field(None, min_length=1)
    grammar: StrictStr | None = Field(None, description="A Lark grammar (llguidance's dialect) or GBNF.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputsRequest":
        forms = [self.json_schema is not None, bool(self.json_object), self.regex is not None,
                 self.choice is not None, self.grammar is not None]
        if sum(forms) != 1:
            raise ValueError("set exactly one of json, json_object, regex, choice, grammar")
        return self


class JsonSchemaResponseFormat(_Body):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="A JSON Schema; omitted: any JSON object.")
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object ({name, schema, strict})")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type 'json_schema', not {self.type!r}")
        return self


class SamplingRequestFields(_Body):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: StrictStr | None = Field(None, description="Served model name; omitted means the served model.")
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    temperature: Float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    seed: Int64 | None = None
    user: StrictStr | None = None
    # Extras beyond OpenAI's schema, accepted under vLLM's names.
    top_k: StrictInt | None = Field(None, ge=-1, description="0 or -1 disables.")
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Float | None = Field(None, ge=0.01, le=10.0)
    ignore_eos: StrictBool = False
    min_tokens: NonNegativeInt = 0
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    speculative: StrictBool = Field(True, description="false: this request never uses speculative decoding.")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object, or json_schema ({name, schema, strict}): the output is constrained to it."
    )
    structured_outputs: StructuredOutputsRequest | None = Field(
        None, description="vLLM's constrained decoding: json (a schema), json_object, regex, choice or grammar."
    )
    cache: StrictBool = Field(True, description="false: the response cache is neither read nor written for it.")
    # Ollama's keep_alive: how long the model stays loaded after this request ("5m", "30s", seconds; 0 unloads it
    # once idle, a negative value keeps it loaded); it becomes the model's keep-alive (state.apply_keep_alive).
    keep_alive: StrictStr | Float | None = None


class FunctionDefinition(_Body):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments object.")
    strict: StrictBool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequestFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default 'auto' with tools, 'none' without. required / a named function constrain the output."
    )
    parallel_tool_calls: StrictBool | None = Field(None, description="false: at most one call per answer.")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated by OpenAI; refused: use tools.")
    function_call: StrictStr | dict[str, Any] | None = Field(None, description="Deprecated by OpenAI; refused: use tool_choice.")
    echo: StrictBool | None = Field(None, description="Not a chat parameter; refused with 400 when given.")
    max_tokens: PositiveInt | None = Field(None, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("functions is deprecated by OpenAI and not supported: use tools")
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value is not None:
            raise ValueError("function_call is deprecated by OpenAI and not supported: use tool_choice")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value is not None:
            raise ValueError("echo is a parameter of /v1/completions, not of /v1/chat/completions")
        return value


PromptValue = StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]


def _validate_prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """The rules of `PromptValue`, checked in Python rather than by pydantic's union: for a prompt of a million
    token ids pydantic's check holds the GIL for ~200 ms in one go (every other request waits, /health too),
    while these loops run as Python bytecode, which lets the event loop in every few milliseconds."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists")
    if not value:
        return value
    if isinstance(value[0], str):
        if not all(type(item) is str for item in value):
            raise ValueError("a list of prompts must hold only strings")
        return value
    if isinstance(value[0], list):
        for position, ids in enumerate(value):
            if not isinstance(ids, list) or not _is_token_id_list(ids):
                raise ValueError(f"prompt[{position}] must be a list of token ids (integers >= 0)")
        return value
    if not _is_token_id_list(value):
        raise ValueError("a list of token ids must hold only integers >= 0")
    return value


def _is_token_id_list(ids: list[Any]) -> bool:
    return all(type(t) is int for t in ids) and (not ids or min(ids) >= 0)


class CompletionRequest(SamplingRequestFields):
    prompt: Annotated[
        Any, PlainValidator(_validate_prompt), WithJsonSchema(TypeAdapter(PromptValue).json_schema())
    ]
    max_tokens: PositiveInt | None = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)
    suffix: StrictStr | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ChatResponseToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inferd"
    root: str | None = None  # the local path the model was loaded from
    kind: Literal["generate", "embed", "tabular"] = "generate"  # inferd's extension: what the model does
    status: str | None = None  # loading | ready | failed | unloaded | stopped
    max_model_len: int | None = None  # tokens per sequence (generate: prompt + output; embed: input)
    dimensions: int | None = None  # embed: the length of each vector


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
