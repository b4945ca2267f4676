"""The OpenAI-compatible server as users meet it: a real `inferd serve` subprocess (fixture `inferd_server`, from
tests/server_fixtures.py), the official openai client (sync and async), httpx for raw SSE and /metrics.

References: the transformers tokenizer on the served model file (token counts), the server's own greedy output
(stop strings, sampling filters that must reduce to greedy, batch-vs-alone), prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_fixtures import InferdServer, log_tail

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
PROMPT = "The three primary colors are"
REPETITIVE_PROMPT = "one one one one one one one one one one one one"


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def client(inferd_server: InferdServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{inferd_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(inferd_server: InferdServer) -> str:
    return inferd_server.model_name


@pytest.fixture(scope="module")
def http(inferd_server: InferdServer) -> httpx.Client:
    with httpx.Client(base_url=inferd_server.base_url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def hf_tokenizer(hf_default_tokenizer: Any, http: httpx.Client) -> Any:
    """transformers' tokenizer (tests/conftest.py) for the same store file the server loaded."""
    served_path = http.get("/v1/models").json()["data"][0]["root"]
    assert Path(served_path).parent.resolve() == Path(hf_default_tokenizer.name_or_path).resolve(), served_path
    return hf_default_tokenizer


def scrape(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset], float], name: str, model: str, **labels: str) -> float:
    return samples.get((name, frozenset({"model_name": model, **labels}.items())), 0.0)


def wait_until_idle(
    http: httpx.Client, model: str, idle_kv_usage: float, timeout_s: float = 120.0, min_aborts: float = 0.0
) -> dict:
    """Poll /metrics until nothing runs or waits, the KV usage is back at its idle value, and at least `min_aborts`
    aborted requests were recorded (a disconnect is recorded by the server after the client has gone: on a busy
    machine the engine may look idle before the aborted request was even queued)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(http)
        running = metric(samples, "inferd:num_requests_running", model)
        waiting = metric(samples, "inferd:num_requests_waiting", model)
        usage = metric(samples, "inferd:kv_cache_usage_ratio", model)
        aborts = metric(samples, "inferd:request_success_total", model, finished_reason="abort")
        if running == 0 and waiting == 0 and usage == idle_kv_usage and aborts >= min_aborts:
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {timeout_s} s: running={running} waiting={waiting} kv={usage} "
                        f"aborts={aborts} (want >= {min_aborts})")
        time.sleep(0.1)


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of an SSE response, in order ([DONE] included)."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def greedy_completion(client: openai.OpenAI, model: str, prompt: Any = PROMPT, max_tokens: int = 16, **extra: Any) -> Any:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)


def greedy_chat(client: openai.OpenAI, model: str, max_tokens: int = 16, **extra: Any) -> Any:
    return client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, temperature=0, **extra)


# ---------------------------------------------------------------------------------------------- ops routes


def test_health_models_docs(http: httpx.Client, model: str) -> None:
    assert http.get("/health").json()["status"] == "ok"
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [model]
    assert models["data"][0]["max_model_len"] == 2048
    spec = http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics"):
        assert path in spec["paths"], path
    assert spec["paths"]["/tokenize"]["post"]["tags"] == ["inferd"]
    assert spec["paths"]["/v1/chat/completions"]["post"]["tags"] == ["OpenAI-compatible"]
    assert http.get("/docs").status_code == 200


def test_tokenize_detokenize_match_transformers(http: httpx.Client, model: str, hf_tokenizer: Any) -> None:
    text = "Hello world, how are you today? 12345"
    body = http.post("/tokenize", json={"model": model, "prompt": text}).json()
    assert body["tokens"] == hf_tokenizer.encode(text)
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 2048
    assert http.post("/detokenize", json={"model": model, "tokens": body["tokens"]}).json()["prompt"] == text

    chat = http.post("/tokenize", json={"model": model, "messages": CHAT}).json()
    expected = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expected_ids = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert chat["tokens"] == list(expected_ids)


# ---------------------------------------------------------------------------------------------- usage, streaming


def test_chat_usage_counts_match_tokenizer(client: openai.OpenAI, model: str, hf_tokenizer: Any) -> None:
    response = greedy_chat(client, model, max_tokens=9, extra_body={"ignore_eos": True})
    expected = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expected_ids = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert response.object == "chat.completion"
    assert response.model == model
    assert response.usage.prompt_tokens == len(expected_ids)
    assert response.usage.completion_tokens == 9
    assert response.usage.total_tokens == len(expected_ids) + 9
    assert response.usage.prompt_tokens_details.cached_tokens >= 0
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.role == "assistant"


def test_completion_usage_counts_match_tokenizer(client: openai.OpenAI, model: str, hf_tokenizer: Any) -> None:
    response = greedy_completion(client, model, max_tokens=7, extra_body={"ignore_eos": True})
    assert response.object == "text_completion"
    assert response.usage.prompt_tokens == len(hf_tokenizer.encode(PROMPT))
    assert response.usage.completion_tokens == 7
    assert response.choices[0].finish_reason == "length"


def test_chat_stream_raw_sse(inferd_server: InferdServer, client: openai.OpenAI, model: str) -> None:
    reference = greedy_chat(client, model, max_tokens=12)
    body = {"model": model, "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{inferd_server.base_url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == model for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content_chunks = [c for c in chunks if c["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks)
    assert text == reference.choices[0].message.content
    finish_reasons = [c["choices"][0]["finish_reason"] for c in content_chunks if c["choices"][0]["finish_reason"]]
    assert finish_reasons == [reference.choices[0].finish_reason]
    # include_usage: every chunk carries "usage" (null), the last one has choices [] and the totals.
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == reference.usage.prompt_tokens
    assert chunks[-1]["usage"]["completion_tokens"] == reference.usage.completion_tokens


def test_completion_stream_openai_client(client: openai.OpenAI, model: str) -> None:
    reference = greedy_completion(client, model, max_tokens=12)
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference.choices[0].text
    assert chunks[-1].usage.completion_tokens == reference.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == reference.usage.prompt_tokens


def test_completion_accepts_token_ids_and_several_prompts(client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    other_prompt = "Once upon a time"
    reference = [greedy_completion(client, model, prompt=p, max_tokens=8).choices[0].text for p in (PROMPT, other_prompt)]
    ids = http.post("/tokenize", json={"model": model, "prompt": PROMPT}).json()["tokens"]
    assert greedy_completion(client, model, prompt=ids, max_tokens=8).choices[0].text == reference[0]

    both = greedy_completion(client, model, prompt=[PROMPT, other_prompt], max_tokens=8)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == reference
    stream = client.completions.create(model=model, prompt=[PROMPT, other_prompt], max_tokens=8, temperature=0, stream=True)
    streamed = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == reference


# ---------------------------------------------------------------------------------------------- parameters


def test_n2(client: openai.OpenAI, model: str) -> None:
    greedy = greedy_chat(client, model, max_tokens=10).choices[0].message.content
    both = greedy_chat(client, model, max_tokens=10, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.message.content for c in both.choices] == [greedy, greedy]

    sampled = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, n=2, temperature=1.0, seed=7,
                                        extra_body={"ignore_eos": True})  # fmt: skip
    assert sorted(c.index for c in sampled.choices) == [0, 1]
    assert sampled.usage.completion_tokens == 20
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=3, stream=True)
    finish_counts = {0: 0, 1: 0}
    for chunk in stream:
        for choice in chunk.choices:
            finish_counts[choice.index] += choice.finish_reason is not None
    assert finish_counts == {0: 1, 1: 1}


def test_stop_strings_cut_exactly(client: openai.OpenAI, model: str) -> None:
    full = greedy_completion(client, model, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick a stop string with text in it from {full!r}"
    expected = full[: full.index(stop)]

    cut = greedy_completion(client, model, max_tokens=24, stop=[stop, "zzzz-never"], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True,
                                         extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    kept = greedy_completion(client, model, max_tokens=24, stop=stop,
                             extra_body={"ignore_eos": True, "include_stop_str_in_output": True})  # fmt: skip
    assert kept.choices[0].text == expected + stop

    chat_full = greedy_chat(client, model, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
    chat_stop = chat_full[len(chat_full) // 2 : len(chat_full) // 2 + 3]
    chat_cut = greedy_chat(client, model, max_tokens=24, stop=chat_stop, extra_body={"ignore_eos": True})
    assert chat_cut.choices[0].message.content == chat_full[: chat_full.index(chat_stop)]
    assert chat_cut.choices[0].finish_reason == "stop"


def test_seed_reproducible(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        response = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=1.0, seed=seed,
                                                  extra_body={"ignore_eos": True})  # fmt: skip
        return response.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_filters_that_reduce_to_greedy(client: openai.OpenAI, model: str) -> None:
    greedy = greedy_completion(client, model, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        response = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=5,
                                              extra_body={"ignore_eos": True, **extra})  # fmt: skip
        assert response.choices[0].text == greedy, extra
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=1e-6, seed=5,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert response.choices[0].text == greedy


def test_penalties_change_repetitive_output(client: openai.OpenAI, model: str) -> None:
    def run(**kwargs: Any) -> str:
        response = client.completions.create(model=model, prompt=REPETITIVE_PROMPT, max_tokens=16, temperature=0, **kwargs)
        return response.choices[0].text

    baseline = run(extra_body={"ignore_eos": True})
    assert run(presence_penalty=2.0, extra_body={"ignore_eos": True}) != baseline
    assert run(frequency_penalty=2.0, extra_body={"ignore_eos": True}) != baseline
    assert run(extra_body={"ignore_eos": True, "repetition_penalty": 2.0}) != baseline


def test_logit_bias(client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    token_id = http.post("/tokenize", json={"model": model, "prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    forced = greedy_completion(client, model, max_tokens=4, logit_bias={str(token_id): 100},
                               extra_body={"ignore_eos": True})  # fmt: skip
    expected = http.post("/detokenize", json={"model": model, "tokens": [token_id] * 4}).json()["prompt"]
    assert forced.choices[0].text == expected

    greedy = greedy_completion(client, model, max_tokens=1, logprobs=0, extra_body={"ignore_eos": True})
    first = greedy.choices[0].logprobs.tokens[0]
    first_id = http.post("/tokenize", json={"model": model, "prompt": first, "add_special_tokens": False}).json()["tokens"]
    banned = greedy_completion(client, model, max_tokens=1, logit_bias={str(first_id[0]): -100},
                               extra_body={"ignore_eos": True})  # fmt: skip
    assert banned.choices[0].text != greedy.choices[0].text


def test_min_tokens_and_ignore_eos(client: openai.OpenAI, model: str, hf_tokenizer: Any) -> None:
    eos_bias = {str(hf_tokenizer.eos_token_id): 100}  # the model wants to stop at once
    stopped = greedy_chat(client, model, max_tokens=20, logit_bias=eos_bias)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 5
    held = greedy_chat(client, model, max_tokens=20, logit_bias=eos_bias, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens >= 5
    ignored = greedy_chat(client, model, max_tokens=8, logit_bias=eos_bias, extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.usage.completion_tokens == 8


def test_max_completion_tokens_and_user(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=5, temperature=0,
                                              user="user-1234", extra_body={"ignore_eos": True})  # fmt: skip
    assert response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"


def test_chat_logprobs_shape(client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    response = greedy_chat(client, model, max_tokens=8, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(top[0])
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == response.choices[0].message.content

    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)

    # The same prompt ids through /v1/completions give the same tokens and logprobs.
    ids = http.post("/tokenize", json={"model": model, "messages": CHAT}).json()["tokens"]
    completion = greedy_completion(client, model, prompt=ids, max_tokens=8, logprobs=3, extra_body={"ignore_eos": True})
    assert completion.choices[0].logprobs.tokens == [e.token for e in content]
    assert completion.choices[0].logprobs.token_logprobs == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_completion_logprobs_shape(client: openai.OpenAI, model: str) -> None:
    response = greedy_completion(client, model, max_tokens=8, logprobs=2, extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset[0] == 0
    for i, token in enumerate(logprobs.tokens[:-1]):
        assert logprobs.text_offset[i + 1] - logprobs.text_offset[i] == len(token)
    for token, token_logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2  # two ids can decode to the same string
        assert token_logprob == pytest.approx(max(top.values()))
        assert top[token] == pytest.approx(token_logprob)

    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    tokens: list[str] = []
    offsets: list[int] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == logprobs.tokens
    assert offsets == logprobs.text_offset


# ---------------------------------------------------------------------------------------------- concurrency, disconnects


def test_32_concurrent_streams_match_one_at_a_time(inferd_server: InferdServer, model: str) -> None:
    prompts = [f"Write a short line about the number {k}." for k in range(4)]

    async def stream_text(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str]:
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=12, temperature=0, stream=True)  # fmt: skip
        text, finish_reason = "", ""
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish_reason = choice.finish_reason or finish_reason
        return text, finish_reason

    async def main() -> tuple[list, list]:
        async with openai.AsyncOpenAI(base_url=f"{inferd_server.base_url}/v1", api_key="unused", max_retries=0,
                                      timeout=600) as client:  # fmt: skip
            alone = [await stream_text(client, p) for p in prompts]
            together = await asyncio.gather(*(stream_text(client, prompts[i % len(prompts)]) for i in range(32)))
        return alone, list(together)

    alone, together = asyncio.run(main())
    assert all(text for text, _ in alone)
    assert together == [alone[i % len(prompts)] for i in range(32)]


def test_stream_disconnect_aborts_and_frees_kv(inferd_server: InferdServer, http: httpx.Client, model: str) -> None:
    idle = wait_until_idle(http, model, idle_kv_usage=0.0)
    aborts_before = metric(idle, "inferd:request_success_total", model, finished_reason="abort")
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{inferd_server.base_url}/v1/completions", json=body, timeout=300) as response:
        lines = response.iter_lines()
        num_events = 0
        for line in lines:
            num_events += line.startswith("data: ")
            if num_events == 3:
                break
        during = scrape(http)
        assert metric(during, "inferd:num_requests_running", model) == 1
        assert metric(during, "inferd:kv_cache_usage_ratio", model) > 0.0
    after = wait_until_idle(http, model, idle_kv_usage=0.0, min_aborts=aborts_before + 1)
    assert metric(after, "inferd:request_success_total", model, finished_reason="abort") == aborts_before + 1
    # The engine stopped generating when the client left: far fewer than the 1500 tokens asked for.
    num_generated = metric(after, "inferd:generation_tokens_total", model) - metric(idle, "inferd:generation_tokens_total", model)
    assert 3 <= num_generated < 1500


def test_non_streaming_disconnect_aborts(inferd_server: InferdServer, http: httpx.Client, model: str) -> None:
    idle = wait_until_idle(http, model, idle_kv_usage=0.0)
    aborts_before = metric(idle, "inferd:request_success_total", model, finished_reason="abort")
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{inferd_server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(300, read=2.0))
    after = wait_until_idle(http, model, idle_kv_usage=0.0, min_aborts=aborts_before + 1)
    assert metric(after, "inferd:request_success_total", model, finished_reason="abort") == aborts_before + 1
    num_generated = metric(after, "inferd:generation_tokens_total", model) - metric(idle, "inferd:generation_tokens_total", model)
    assert num_generated < 1500


# ---------------------------------------------------------------------------------------------- metrics and logs


def test_metrics_and_request_log(inferd_server: InferdServer, client: openai.OpenAI, http: httpx.Client, model: str) -> None:
    # A prompt no earlier request shares (the uuid comes first), long enough for several full KV blocks.
    prompt = f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 8
    before = wait_until_idle(http, model, idle_kv_usage=0.0)
    # One token per output (no speculative runs), so the inter-token histogram counts tokens - 1 per request.
    one_per_step = {"ignore_eos": True, "speculative": False}
    first = greedy_completion(client, model, prompt=prompt, max_tokens=6, extra_body=one_per_step)
    second = greedy_completion(client, model, prompt=prompt, max_tokens=6, extra_body=one_per_step)
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, model, **labels) - metric(before, name, model, **labels)

    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert delta("inferd:prompt_tokens_total") == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert delta("inferd:generation_tokens_total") == 12
    assert delta("inferd:request_success_total", finished_reason="length") == 2
    assert delta("inferd:prefix_cache_hits_total") == second.usage.prompt_tokens_details.cached_tokens
    assert delta("inferd:prefix_cache_queries_total") >= delta("inferd:prefix_cache_hits_total")
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "time_per_output_token_seconds"):  # fmt: skip
        assert delta(f"inferd:{histogram}_count") == 2, histogram
    assert delta("inferd:inter_token_latency_seconds_count") == 2 * 5
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio"):
        assert (f"inferd:{gauge}", frozenset({"model_name": model}.items())) in after

    log_lines = {}
    for line in Path(inferd_server.process.log_path).read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            log_lines[entry.get("id")] = entry
    for response in (first, second):
        entry = log_lines.get(response.id)
        assert entry is not None, log_tail(inferd_server.process)
        assert entry["status"] == "ok"
        assert entry["prompt_tokens"] == response.usage.prompt_tokens
        assert entry["output_tokens"] == response.usage.completion_tokens
        assert entry["cached_tokens"] == response.usage.prompt_tokens_details.cached_tokens
        assert entry["ttft_s"] > 0 and entry["duration_s"] >= entry["ttft_s"]
