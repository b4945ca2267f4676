"""Layer 5: POST /v1/chat/completions and POST /v1/completions, OpenAI's wire format (SSE when streaming).

A request's path: validate the body (protocol.py) -> tokenize (chat template for chat) -> SamplingParams ->
AsyncEngine.add_request (waits until the engine accepted it, so invalid input is a 400, never a broken stream)
-> stream chunks or collect the final output. A client that goes away (streaming or not) aborts its request.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from operator import itemgetter
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from inferd.engine.async_engine import AsyncEngine, RequestError, RequestStream
from inferd.engine.tool_calls import (
    TOOL_CALL_START,
    StreamingToolCallParser,
    conversation_for_template,
    parse_tool_calls,
    template_renders_tools,
    tool_call_grammar,
)
from inferd.request import CompletionOutput, RequestOutput, SamplingParams, StructuredOutputsParams
from inferd.server.bodies import OffLoopBodyRoute
from inferd.server.errors import APIError, bad_request, error_body, from_value_error
from inferd.server.metrics import FinishedRequestStats
from inferd.server.response_cache import GenerateLookup
from inferd.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    NamedToolChoice,
    SamplingRequestFields,
)
from inferd.server.state import ARRIVAL_TIME_SCOPE_KEY, MIN_LOGPROB, ServedModel, ServerState
from inferd.serving import ModelKind

router = APIRouter(tags=["OpenAI-compatible"], route_class=OffLoopBodyRoute)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)
}
# Prompts longer than this (characters) are tokenized off the event loop.
_TOKENIZE_IN_THREAD_MIN_CHARS = 32 * 1024
# A conversation of more than _TOKENIZE_IN_THREAD_MIN_CHARS / this many messages goes off the loop whatever their length.
_CHARS_PER_MESSAGE_HINT = 128
# HTTP 499 (nginx's "client closed request"): logged for a request whose client left; nobody receives it.
_CLIENT_CLOSED_STATUS = 499

T = TypeVar("T")


def _state(request: Request) -> ServerState:
    return request.app.state.inferd


def _arrival_time(request: Request) -> float:
    return request.scope.get(ARRIVAL_TIME_SCOPE_KEY) or time.monotonic()


async def _call_maybe_in_thread(num_chars: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if num_chars >= _TOKENIZE_IN_THREAD_MIN_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- request -> engine


def _parse_logit_bias(logit_bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not logit_bias:
        return None
    parsed: dict[int, float] = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids (integers as strings), got {key!r}", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        parsed[token_id] = bias
    return parsed


def _sampling_params(
    body: SamplingRequestFields,
    engine: AsyncEngine,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    param_names: dict[str, str],
    structured_outputs: StructuredOutputsParams | None = None,
    skip_special_tokens: bool | None = None,
) -> SamplingParams:
    logit_bias = _parse_logit_bias(body.logit_bias, engine.tokenizer.vocab_size)
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            include_stop_str_in_output=body.include_stop_str_in_output,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            logit_bias=logit_bias,
            skip_special_tokens=body.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
            speculative=body.speculative,
            structured_outputs=structured_outputs,
        )
    except ValueError as exc:
        raise from_value_error(exc, param_names) from None


def _requested_constraint(body: SamplingRequestFields) -> StructuredOutputsParams | None:
    """`response_format` (OpenAI) or `structured_outputs` (vLLM) as one constraint; both at once is a 400."""
    response_format = body.response_format
    has_format = response_format is not None and response_format.type != "text"
    if has_format and body.structured_outputs is not None:
        raise bad_request("give either response_format or structured_outputs, not both", "structured_outputs")
    try:
        if has_format:
            assert response_format is not None
            if response_format.type == "json_object":
                return StructuredOutputsParams(json_object=True, source="response_format")
            spec = response_format.json_schema
            assert spec is not None
            if spec.schema_ is None:
                return StructuredOutputsParams(json_object=True, source="response_format.json_schema")
            return StructuredOutputsParams(json=json.dumps(spec.schema_, ensure_ascii=False),
                                           source="response_format.json_schema.schema")
        so = body.structured_outputs
        if so is None:
            return None
        if so.json_schema is not None:
            text = so.json_schema if isinstance(so.json_schema, str) else json.dumps(so.json_schema, ensure_ascii=False)
            return StructuredOutputsParams(json=text, source="structured_outputs.json")
        if so.json_object:
            return StructuredOutputsParams(json_object=True, source="structured_outputs.json_object")
        if so.regex is not None:
            return StructuredOutputsParams(regex=so.regex, source="structured_outputs.regex")
        if so.choice is not None:
            return StructuredOutputsParams(choice=tuple(so.choice), source="structured_outputs.choice")
        return StructuredOutputsParams(grammar=so.grammar, source="structured_outputs.grammar")
    except ValueError as exc:
        raise from_value_error(exc) from None


async def _compile_constraint(engine: AsyncEngine, constraint: StructuredOutputsParams) -> None:
    """Compile (or find cached) off the event loop, so a bad grammar is a 400 before anything is queued and a slow
    one never stalls other requests; the engine then finds it in the cache."""
    compiler = engine.grammar_compiler
    if compiler.is_cached(constraint):
        return
    try:
        await asyncio.to_thread(compiler.compile, constraint)
    except ValueError as exc:
        raise from_value_error(exc) from None


async def _add_request(
    engine: AsyncEngine,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    arrival_time: float,
    param_names: dict[str, str],
) -> RequestStream:
    try:
        return await engine.add_request(request_id, prompt_token_ids, params, arrival_time)
    except ValueError as exc:
        raise from_value_error(exc, param_names) from None


def _finished_stats(output: RequestOutput | None, num_prompt_tokens: int) -> FinishedRequestStats:
    if output is None:
        return FinishedRequestStats(num_prompt_tokens, 0, 0, ["abort"], None, None, None, None)
    m = output.metrics
    now = time.monotonic()
    ttft = queue = e2e = tpot = None
    num_max_output_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
    if m is not None:
        if m.first_token_time is not None:
            ttft = m.first_token_time - m.arrival_time
        if m.first_scheduled_time is not None:
            queue = m.first_scheduled_time - m.arrival_time
        end_time = m.finished_time if m.finished_time is not None else now
        e2e = end_time - m.arrival_time
        if m.finished_time is not None and m.first_token_time is not None and num_max_output_tokens > 1:
            tpot = (m.finished_time - m.first_token_time) / (num_max_output_tokens - 1)
    return FinishedRequestStats(
        num_prompt_tokens=num_prompt_tokens,
        num_generation_tokens=sum(len(c.token_ids) for c in output.outputs),
        num_cached_tokens=output.num_cached_tokens,
        finish_reasons=[c.finish_reason or "abort" for c in output.outputs],
        time_to_first_token_s=ttft,
        queue_time_s=queue,
        e2e_latency_s=e2e,
        time_per_output_token_s=tpot,
    )


class _TrackedRequest:
    """One engine request as the server sees it: its outputs feed the inter-token histogram, and when it ends
    (finished, aborted by a disconnect, or failed) its metrics and its JSON log line are recorded once."""

    def __init__(
        self, state: ServerState, served: ServedModel, stream: RequestStream, arrival_time: float, num_prompt_tokens: int
    ) -> None:
        self.state = state
        self.served = served
        self.stream = stream
        self.arrival_time = arrival_time
        self.num_prompt_tokens = num_prompt_tokens
        self._last: RequestOutput | None = None
        self._status = "aborted"
        self._is_closed = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        previous_output_time: float | None = None
        assert self.served.llm_metrics is not None
        observe_itl = self.served.llm_metrics.observe_inter_token_latency
        try:
            async for output in self.stream:
                now = time.monotonic()
                if previous_output_time is not None:
                    observe_itl(now - previous_output_time)
                previous_output_time = now
                self._last = output
                yield output
            if self._last is not None and self._last.finished:
                self._status = "ok"
        except RequestError:
            self._status = "error"
            raise
        finally:
            await self.close()

    async def close(self) -> None:
        """Abort the engine request if it still runs, and record it; safe to call more than once."""
        if self._is_closed:
            return
        self._is_closed = True
        await self.stream.aclose()
        stats = _finished_stats(self._last, self.num_prompt_tokens)
        self.state.record_request(self.served, self.stream.request_id, stats, self._status, time.monotonic() - self.arrival_time)


async def _collect(tracked: _TrackedRequest) -> RequestOutput:
    last: RequestOutput | None = None
    async with aclosing(tracked.outputs()) as outputs:
        async for output in outputs:
            last = output
    assert last is not None and last.finished
    return last


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect_unless_disconnected(request: Request, tracked: Sequence[_TrackedRequest]) -> list[RequestOutput] | None:
    """Final outputs of every request, or None if the client disconnected first (then all are aborted)."""
    work = asyncio.ensure_future(asyncio.gather(*(_collect(t) for t in tracked)))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    is_done = False
    try:
        done, _ = await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        is_done = work in done
    finally:
        for task in (work, watcher):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)
        for t in tracked:  # a collector cancelled before it started never closed its request
            await t.close()
    return work.result() if is_done else None


async def _merge(tracked: Sequence[_TrackedRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several requests in arrival order."""
    if len(tracked) == 1:
        async with aclosing(tracked[0].outputs()) as outputs:
            async for output in outputs:
                yield 0, output
        return
    generators = [t.outputs() for t in tracked]
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(generators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    output = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(generators[index]))] = index
                yield index, output
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for generator in generators:
            await generator.aclose()


class _EventStreamResponse(StreamingResponse):
    """Server-sent events. When the response ends (a disconnect included) its generator is closed and its engine
    requests are aborted at once, even if the generator never started, rather than when garbage is collected."""

    def __init__(self, content: AsyncIterator[str], tracked: Sequence[_TrackedRequest]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._generator = content
        self._tracked = tracked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._generator.aclose()  # type: ignore[attr-defined]
            for t in self._tracked:
                await t.close()


def _usage(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    num_prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    num_completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)},
    }


def _json_logprob(value: float | None) -> float:
    if value is None or math.isnan(value) or value == -math.inf:
        return MIN_LOGPROB
    return max(value, MIN_LOGPROB)


def _top(candidates: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    if num_top <= 0:
        return []
    return heapq.nlargest(num_top, candidates.items(), key=itemgetter(1))


def _chat_logprobs(
    served: ServedModel, completion: CompletionOutput, token_ids: Sequence[int], start: int, num_top: int
) -> list[dict[str, Any]]:
    """OpenAI chat `logprobs.content` entries for completion.token_ids[start : start + len(token_ids)].

    `completion.logprobs` is the engine's live list (it only grows), so entries are indexed from the start.
    """
    entries = []
    all_candidates = completion.logprobs or []
    for offset, token_id in enumerate(token_ids):
        candidates = all_candidates[start + offset] if start + offset < len(all_candidates) else {}
        text = served.token_text(token_id)
        top = []
        for top_id, top_logprob in _top(candidates, num_top):
            top_text = served.token_text(top_id)
            top.append({"token": top_text, "logprob": _json_logprob(top_logprob), "bytes": list(top_text.encode())})
        entries.append(
            {"token": text, "logprob": _json_logprob(candidates.get(token_id)), "bytes": list(text.encode()), "top_logprobs": top}
        )
    return entries


def _completion_logprobs(
    served: ServedModel,
    completion: CompletionOutput,
    token_ids: Sequence[int],
    start: int,
    num_top: int,
    text_offset: int,
) -> tuple[dict[str, Any], int]:
    """OpenAI completions `logprobs` for token_ids (as `_chat_logprobs`), and the text offset after them."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offsets: list[int] = []
    all_candidates = completion.logprobs or []
    for offset, token_id in enumerate(token_ids):
        candidates = all_candidates[start + offset] if start + offset < len(all_candidates) else {}
        text = served.token_text(token_id)
        tokens.append(text)
        token_logprobs.append(_json_logprob(candidates.get(token_id)))
        top_logprobs.append({served.token_text(i): _json_logprob(lp) for i, lp in _top(candidates, num_top)})
        text_offsets.append(text_offset)
        text_offset += len(text)
    logprobs = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offsets}
    return logprobs, text_offset


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


def _error_event(exc: BaseException) -> str:
    return _sse(error_body(500, f"generation failed: {exc}"))


# ---------------------------------------------------------------------------------------------- shared path


async def _start_requests(
    state: ServerState,
    served: ServedModel,
    request_id: str,
    prompt_token_ids_list: list[list[int]],
    params: SamplingParams,
    arrival_time: float,
    param_names: dict[str, str],
) -> list[_TrackedRequest]:
    """Queue one engine request per prompt (all or none: a rejected one aborts those already queued)."""
    engine: AsyncEngine = served.engine
    state.check_queue(engine, len(prompt_token_ids_list))
    tracked: list[_TrackedRequest] = []
    try:
        for i, prompt_token_ids in enumerate(prompt_token_ids_list):
            engine_request_id = request_id if len(prompt_token_ids_list) == 1 else f"{request_id}-{i}"
            stream = await _add_request(engine, engine_request_id, prompt_token_ids, params, arrival_time, param_names)
            tracked.append(_TrackedRequest(state, served, stream, arrival_time, len(prompt_token_ids)))
    except BaseException:
        for t in tracked:
            await t.close()
        raise
    return tracked


# (choice index, completion, new text, new token ids) -> one choice of a stream chunk
ChunkChoice = Callable[[int, CompletionOutput, str, Sequence[int]], dict[str, Any]]


async def _event_stream(
    tracked: Sequence[_TrackedRequest],
    base: dict[str, Any],
    n: int,
    include_usage: bool,
    first_choices: list[dict[str, Any]] | None,
    chunk_choice: ChunkChoice,
) -> AsyncIterator[str]:
    """The SSE events of a chat or completions stream: `first_choices` (chat's role delta, completions' echo), one
    chunk per engine output with a choice per completion that advanced (index = prompt index * n + completion
    index), usage last when asked, an error event if the engine failed, then [DONE]."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload = {**base, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return _sse(payload)

    async with aclosing(_merge(tracked)) as outputs:
        try:
            if first_choices:
                yield chunk(first_choices)
            finished_indices: set[int] = set()
            last_outputs: dict[int, RequestOutput] = {}
            async for prompt_index, output in outputs:
                last_outputs[prompt_index] = output
                choices = []
                for position, completion in enumerate(output.outputs):
                    index = prompt_index * n + completion.index
                    if index in finished_indices:
                        continue
                    delta_text = output.delta_texts[position]
                    delta_ids = output.delta_token_ids[position]
                    if not delta_text and not delta_ids and completion.finish_reason is None:
                        continue
                    choices.append(chunk_choice(index, completion, delta_text, delta_ids))
                    if completion.finish_reason is not None:
                        finished_indices.add(index)
                if choices:
                    yield chunk(choices)
            if include_usage and last_outputs:
                yield chunk([], _usage([last_outputs[i] for i in sorted(last_outputs)]))
        except RequestError as exc:
            yield _error_event(exc)
        yield _DONE


async def _respond(
    request: Request,
    tracked: list[_TrackedRequest],
    *,
    stream: bool,
    base: dict[str, Any],
    n: int,
    include_usage: bool,
    first_choices: list[dict[str, Any]] | None,
    chunk_choice: ChunkChoice,
    final_choice: Callable[[int, int, CompletionOutput], dict[str, Any]],
    response_type: Callable[..., Any],
    cache: GenerateLookup,
) -> Any:
    """Stream (SSE) or collect the final outputs into one response; a client that left aborts every request.
    A complete answer goes into the response cache when the request was looked up there."""
    if stream:
        events = _event_stream(tracked, base, n, include_usage, first_choices, chunk_choice)
        events = cache.stream(events, lambda: all(t._status == "ok" for t in tracked))
        return cache.tag(_EventStreamResponse(events, tracked))
    try:
        outputs = await _collect_unless_disconnected(request, tracked)
    except RequestError as exc:
        raise APIError(500, f"generation failed: {exc}", code="generation_failed") from None
    if outputs is None:
        return Response(status_code=_CLIENT_CLOSED_STATUS)
    choices = [
        final_choice(prompt_index * n + completion.index, prompt_index, completion)
        for prompt_index, output in enumerate(outputs)
        for completion in output.outputs
    ]
    return cache.respond(response_type(id=base["id"], created=base["created"], model=base["model"], choices=choices,
                                       usage=_usage(outputs)))


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    return body.stream_options is not None and body.stream_options.include_usage


# ---------------------------------------------------------------------------------------------- chat


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
    summary="Chat completion (streams server-sent events when stream=true)",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    state = _state(request)
    arrival_time = _arrival_time(request)
    served = await state.use_model(body.model, ModelKind.GENERATE)
    state.apply_keep_alive(served, body.keep_alive)
    engine: AsyncEngine = served.engine
    include_usage = _include_usage(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    cache = await state.response_cache.lookup_generate(request, served, body, "/v1/chat/completions")
    if cache.response is not None:
        return cache.response

    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    tool_choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    named_tool = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else None
    if tool_choice != "none" and not tools:
        raise bad_request("tool_choice needs tools: no tools were given", "tool_choice")
    if named_tool is not None and named_tool not in {t["function"]["name"] for t in tools or ()}:
        raise bad_request(f"tool_choice names function {named_tool!r}, which is not in tools", "tool_choice")
    are_tools_offered = bool(tools) and tool_choice != "none"
    constraint = _requested_constraint(body)
    if are_tools_offered and tool_choice != "auto":
        if constraint is not None:
            raise bad_request(
                "response_format / structured_outputs cannot be combined with tool_choice 'required' or a named "
                "function (the output is then a tool call)", "response_format")
        assert tools is not None
        chosen = [t for t in tools if named_tool is None or t["function"]["name"] == named_tool]
        for i, tool in enumerate(tools):  # errors name the tool whose schema is at fault
            if tool in chosen and tool["function"].get("parameters") is not None:
                await _compile_constraint(engine, StructuredOutputsParams(
                    json=json.dumps(tool["function"]["parameters"], ensure_ascii=False),
                    source=f"tools[{i}].function.parameters"))
        # One call unless the request asks for several (llama.cpp's default): small models forced to call tend to
        # repeat calls until max_tokens when more are allowed.
        allow_parallel = named_tool is None and body.parallel_tool_calls is True
        constraint = StructuredOutputsParams(
            grammar=tool_call_grammar(chosen, allow_parallel=allow_parallel), source="tools")
    if constraint is not None:
        await _compile_constraint(engine, constraint)

    def render_prompt() -> list[int]:
        messages = []
        for message in body.messages:
            entry: dict[str, Any] = {"role": message.role, "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            if message.tool_calls:
                entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            messages.append(entry)
        renders_tools = template_renders_tools(engine.tokenizer.tool_chat_template)
        conversation = conversation_for_template(
            messages, tools if are_tools_offered else None, template_renders=renders_tools)
        return engine.tokenizer.encode_chat(
            conversation, add_generation_prompt=body.add_generation_prompt,
            tools=tools if (are_tools_offered and renders_tools) else None)

    # A long conversation is converted and rendered off the event loop (pure Python: the GIL passes back to the
    # loop every few milliseconds); the size is judged without walking the messages.
    size_hint = len(body.messages) * _CHARS_PER_MESSAGE_HINT
    if size_hint < _TOKENIZE_IN_THREAD_MIN_CHARS:
        size_hint = sum(len(m.text()) for m in body.messages)
    try:
        prompt_token_ids = await _call_maybe_in_thread(size_hint, render_prompt)
    except Exception as exc:  # the template rejects the conversation (e.g. roles that must alternate)
        raise bad_request(f"messages: the chat template failed: {exc}", "messages") from None

    max_tokens_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    param_names = {"prompt": "messages", "logprobs": "top_logprobs", "max_tokens": max_tokens_name}
    num_top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    # The call tags must reach the parser even where the vocabulary makes them special tokens.
    tag_id = engine.tokenizer.token_to_id(TOOL_CALL_START)
    keep_special = are_tools_offered and tag_id is not None and tag_id in engine.tokenizer.all_special_ids
    params = _sampling_params(
        body,
        engine,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        logprobs=num_top_logprobs,
        param_names=param_names,
        structured_outputs=constraint,
        skip_special_tokens=False if keep_special else None,
    )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    tracked = await _start_requests(state, served, request_id, [prompt_token_ids], params, arrival_time, param_names)

    def logprobs_of(completion: CompletionOutput, token_ids: Sequence[int]) -> dict[str, Any] | None:
        if num_top_logprobs is None:
            return None
        start = len(completion.token_ids) - len(token_ids)
        return {"content": _chat_logprobs(served, completion, token_ids, start, num_top_logprobs)}

    def finish_reason(completion: CompletionOutput, has_calls: bool) -> str | None:
        # OpenAI: "tool_calls" when the model chose to call; a forced named function ends with "stop".
        if has_calls and completion.finish_reason == "stop" and named_tool is None:
            return "tool_calls"
        return completion.finish_reason

    tool_parsers: dict[int, StreamingToolCallParser] = {}

    def chunk_choice(index: int, completion: CompletionOutput, delta_text: str, delta_ids: Sequence[int]) -> dict[str, Any]:
        if not are_tools_offered:
            delta = {"content": delta_text} if (delta_text or delta_ids) else {}
            reason = completion.finish_reason
        else:
            parser = tool_parsers.setdefault(index, StreamingToolCallParser())
            delta = parser.feed(delta_text, is_final=completion.finish_reason is not None)
            reason = finish_reason(completion, bool(parser.calls))
        return {
            "index": index,
            "delta": delta,
            "logprobs": logprobs_of(completion, delta_ids) if delta_ids else None,
            "finish_reason": reason,
        }

    def final_choice(index: int, _prompt_index: int, completion: CompletionOutput) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        reason = completion.finish_reason
        if are_tools_offered:
            content, calls = parse_tool_calls(completion.text)
            message = {"role": "assistant", "content": content,
                       "tool_calls": [call.to_openai() for call in calls] or None}
            reason = finish_reason(completion, bool(calls))
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs_of(completion, completion.token_ids),
            "finish_reason": reason,
        }

    role_delta = {"role": "assistant", "content": ""}
    return await _respond(
        request,
        tracked,
        stream=body.stream,
        base={"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": served.name},
        n=body.n,
        include_usage=include_usage,
        first_choices=[{"index": i, "delta": role_delta, "logprobs": None, "finish_reason": None} for i in range(body.n)],
        chunk_choice=chunk_choice,
        final_choice=final_choice,
        response_type=ChatCompletionResponse,
        cache=cache,
    )


# ---------------------------------------------------------------------------------------------- completions


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
    summary="Text completion of one or several prompts (streams server-sent events when stream=true)",
)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    state = _state(request)
    arrival_time = _arrival_time(request)
    served = await state.use_model(body.model, ModelKind.GENERATE)
    state.apply_keep_alive(served, body.keep_alive)
    engine: AsyncEngine = served.engine
    include_usage = _include_usage(body)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request(f"best_of must equal n ({body.n}) when given; choosing among samples is not supported", "best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported (prompt logprobs are not computed)", "echo")
    cache = await state.response_cache.lookup_generate(request, served, body, "/v1/completions")
    if cache.response is not None:
        return cache.response

    prompts = _prompts(body.prompt)
    state.check_queue(engine, len(prompts))  # before tokenizing: a request that cannot be queued costs nothing
    prompt_token_ids_list: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt must not be empty", "prompt")
            ids = await _call_maybe_in_thread(len(prompt), engine.tokenizer.encode, prompt, add_special_tokens=True)
            prompt_token_ids_list.append(ids)
        else:
            prompt_token_ids_list.append(list(prompt))
    param_names = {"prompt": "prompt", "logprobs": "logprobs", "max_tokens": "max_tokens"}
    constraint = _requested_constraint(body)
    if constraint is not None:
        await _compile_constraint(engine, constraint)
    params = _sampling_params(body, engine, max_tokens=body.max_tokens, logprobs=body.logprobs, param_names=param_names,
                              structured_outputs=constraint)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    tracked = await _start_requests(state, served, request_id, prompt_token_ids_list, params, arrival_time, param_names)

    echo_texts = None
    if body.echo:
        echo_texts = [p if isinstance(p, str) else engine.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    num_top_logprobs = body.logprobs
    text_offsets: dict[int, int] = {}  # choice index -> characters streamed so far (completions' text_offset)

    def chunk_choice(index: int, completion: CompletionOutput, delta_text: str, delta_ids: Sequence[int]) -> dict[str, Any]:
        logprobs = None
        if num_top_logprobs is not None and delta_ids:
            start = len(completion.token_ids) - len(delta_ids)
            logprobs, text_offsets[index] = _completion_logprobs(
                served, completion, delta_ids, start, num_top_logprobs, text_offsets.get(index, 0)
            )
        return {"index": index, "text": delta_text, "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def final_choice(index: int, prompt_index: int, completion: CompletionOutput) -> dict[str, Any]:
        logprobs = None
        if num_top_logprobs is not None:
            logprobs, _ = _completion_logprobs(served, completion, completion.token_ids, 0, num_top_logprobs, 0)
        prefix = echo_texts[prompt_index] if echo_texts is not None else ""
        return {"index": index, "text": prefix + completion.text, "logprobs": logprobs,
                "finish_reason": completion.finish_reason}

    first_choices = None
    if echo_texts is not None:
        first_choices = [
            {"index": p * body.n + i, "text": text, "logprobs": None, "finish_reason": None}
            for p, text in enumerate(echo_texts)
            for i in range(body.n)
        ]
    return await _respond(
        request,
        tracked,
        stream=body.stream,
        base={"id": request_id, "object": "text_completion", "created": int(time.time()), "model": served.name},
        n=body.n,
        include_usage=include_usage,
        first_choices=first_choices,
        chunk_choice=chunk_choice,
        final_choice=final_choice,
        response_type=CompletionResponse,
        cache=cache,
    )
