"""Layer 5: request and response bodies of the HTTP API (OpenAI's schema plus vLLM-style extras).

Scalars are strict (no "5" for 5, no true for 1), as OpenAI's API is; range checks that SamplingParams also
makes are repeated here only where the request's name differs from SamplingParams' or a bound keeps a value
away from the engine (seed must fit int64).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

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


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextContentPart] | None = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> "ChatMessage":
        # Only an assistant turn (one that called tools) may come without content, as in OpenAI's API.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


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
    repetition_penalty: Float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: StrictBool = False
    min_tokens: NonNegativeInt = 0
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    speculative: StrictBool = Field(True, description="false: this request never uses speculative decoding.")
    # Ollama's keep_alive: how long the model stays loaded after this request ("5m", "30s", seconds; 0 unloads it
    # once idle, a negative value keeps it loaded); it becomes the model's keep-alive (state.apply_keep_alive).
    keep_alive: StrictStr | Float | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# OpenAI chat fields inferd cannot honour yet: refused with a 400 naming the field rather than ignored.
_NOT_YET = "is not supported yet by inferd (structured output and tool calling are planned)"


class ChatCompletionRequest(SamplingRequestFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = Field(
        None, description="Only {'type': 'text'} for now; json_object and json_schema are refused with 400."
    )
    tools: list[dict[str, Any]] | None = Field(None, description="Refused with 400 when non-empty (not supported yet).")
    tool_choice: StrictStr | dict[str, Any] | None = Field(None, description="Only 'none' is accepted for now.")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated by OpenAI; refused with 400.")
    function_call: StrictStr | dict[str, Any] | None = Field(None, description="Deprecated by OpenAI; refused.")
    echo: StrictBool | None = Field(None, description="Not a chat parameter; refused with 400 when given.")
    max_tokens: PositiveInt | None = Field(None, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type != "text":
            raise ValueError(f"type {value.type!r} {_NOT_YET}; only 'text' is accepted")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError(f"tool calling {_NOT_YET}")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value is not None and value != "none":
            raise ValueError(f"tool calling {_NOT_YET}; only 'none' is accepted")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value is not None:
            raise ValueError("echo is a parameter of /v1/completions, not of /v1/chat/completions")
        return value


class CompletionRequest(SamplingRequestFields):
    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
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


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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
