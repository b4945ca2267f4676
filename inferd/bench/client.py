"""The only module of the bench tool that speaks HTTP (httpx): streaming OpenAI requests, /tokenize, /v1/models.

Works against any OpenAI-compatible server: inferd, vLLM, SGLang, llama.cpp's llama-server.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from inferd.bench.datasets import BenchRequest
from inferd.bench.metrics import RequestResult

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
MAX_ERROR_CHARS = 300


def normalize_base_url(base_url: str) -> str:
    """Server root without a trailing slash or /v1: both 'http://h:8000' and 'http://h:8000/v1/' work."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_payload(
    request: BenchRequest, endpoint: str, model: str, is_ignore_eos: bool, extra_body: dict[str, Any]
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        payload["messages"] = request.as_chat_messages()
    elif endpoint == "completions":
        payload["prompt"] = request.as_prompt()
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; supported: {', '.join(ENDPOINT_PATHS)}")
    if is_ignore_eos:
        # Not in the OpenAI schema; inferd, vLLM, SGLang and llama.cpp honour it, so every answer has max_tokens.
        payload["ignore_eos"] = True
    payload.update(extra_body)
    return payload


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _error_message(body: bytes) -> str:
    try:
        decoded = json.loads(body)
    except ValueError:
        return _short(body.decode("utf-8", "replace"))
    error = decoded.get("error", decoded) if isinstance(decoded, dict) else decoded
    if isinstance(error, dict) and "message" in error:
        return _short(str(error["message"]))
    return _short(json.dumps(error))


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


class OpenAIStreamClient:
    """Sends BenchRequests as streaming OpenAI requests and times them. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        model: str,
        endpoint: str = "completions",
        api_key: str | None = None,
        is_ignore_eos: bool = True,
        extra_body: dict[str, Any] | None = None,
        request_timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"unknown endpoint {endpoint!r}; supported: {', '.join(ENDPOINT_PATHS)}")
        self.url = normalize_base_url(base_url) + ENDPOINT_PATHS[endpoint]
        self.model = model
        self.endpoint = endpoint
        self.headers = auth_headers(api_key)
        self.is_ignore_eos = is_ignore_eos
        self.extra_body = dict(extra_body or {})
        self.request_timeout_s = request_timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> OpenAIStreamClient:
        # httpx caps a pool at 100 connections by default, which would silently cap the concurrency measured.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.request_timeout_s), limits=limits, transport=self._transport
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, request: BenchRequest) -> RequestResult:
        assert self._client is not None, "use OpenAIStreamClient as an async context manager"
        payload = build_payload(request, self.endpoint, self.model, self.is_ignore_eos, self.extra_body)
        result = RequestResult(requested_output_tokens=request.max_tokens if self.is_ignore_eos else 0)
        text_parts: list[str] = []
        num_text_chunks = 0
        start_s = time.perf_counter()
        last_text_s = start_s
        try:
            async with self._client.stream("POST", self.url, json=payload, headers=self.headers) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, SSE comments and event names
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        result.error = f"stream error: {_error_message(data.encode())}"
                        return result
                    now_s = time.perf_counter()
                    text = _chunk_text(chunk)
                    if text:
                        if num_text_chunks == 0:
                            result.ttft_s = now_s - start_s
                        else:
                            result.itl_s.append(now_s - last_text_s)
                        last_text_s = now_s
                        num_text_chunks += 1
                        text_parts.append(text)
                    usage = chunk.get("usage")
                    if usage:
                        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        result.output_tokens = int(usage.get("completion_tokens") or 0)
                        result.has_usage = True
            result.e2e_s = time.perf_counter() - start_s
        except httpx.HTTPError as exc:
            result.error = f"{type(exc).__name__}: {_short(str(exc))}"
            return result
        except (ValueError, LookupError, AttributeError, TypeError) as exc:
            # Not JSON, or JSON of another shape: one malformed answer is a failed request, not a crashed run.
            result.error = f"bad stream chunk: {type(exc).__name__}: {_short(str(exc))}"
            return result
        if num_text_chunks == 0:
            result.error = "stream ended without output text"
            return result
        if not result.has_usage:
            result.output_tokens = num_text_chunks
        result.output_text = "".join(text_parts)
        result.is_success = True
        return result


def fetch_first_model_name(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The first id listed by GET /v1/models."""
    url = normalize_base_url(base_url) + "/v1/models"
    try:
        response = httpx.get(url, headers=auth_headers(api_key), timeout=timeout_s)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise RuntimeError(f"cannot list models at {url} ({type(exc).__name__}: {exc}); is the server up?") from None
    if not models:
        raise RuntimeError(f"{url} lists no model; pass --model")
    return str(models[0]["id"])


class TokenizeEndpoint:
    """Counts tokens with the server's tokenizer endpoint (a `TokenCounter`); `open` returns None without one.

    Tries POST /tokenize with {"model", "prompt"} (inferd, vLLM, SGLang), then with {"content"} (llama.cpp).
    """

    def __init__(self, client: httpx.Client, url: str, body_shape: str, model: str) -> None:
        self._client = client
        self.url = url
        self.body_shape = body_shape
        self.model = model

    @classmethod
    def open(
        cls,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> TokenizeEndpoint | None:
        url = normalize_base_url(base_url) + "/tokenize"
        client = httpx.Client(timeout=timeout_s, headers=auth_headers(api_key), transport=transport)
        for body_shape in ("prompt", "content"):
            endpoint = cls(client, url, body_shape, model)
            # A server may answer 200 with no tokens for a body shape it does not read (llama.cpp: "prompt").
            num_short, num_long = endpoint.try_count("hello world"), endpoint.try_count("hello world " * 4)
            if num_short and num_long and num_long > num_short:
                return endpoint
        client.close()
        return None

    def body(self, text: str) -> dict[str, Any]:
        if self.body_shape == "prompt":
            return {"model": self.model, "prompt": text}
        return {"content": text}

    def try_count(self, text: str) -> int | None:
        try:
            response = self._client.post(self.url, json=self.body(text))
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            decoded = response.json()
        except ValueError:
            return None
        if not isinstance(decoded, dict):
            return None
        if isinstance(decoded.get("count"), int):
            return decoded["count"]
        if isinstance(decoded.get("tokens"), list):
            return len(decoded["tokens"])
        return None

    def __call__(self, text: str) -> int:
        num_tokens = self.try_count(text)
        if num_tokens is None:
            raise RuntimeError(f"{self.url} stopped answering while calibrating prompts")
        return num_tokens

    def close(self) -> None:
        self._client.close()
