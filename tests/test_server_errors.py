"""Bad input gets a 4xx in OpenAI's error shape and the server lives on; API key, queue limit, SIGTERM drain.

Uses the shared `inferd_server` (no key) and one more server, started here, with an API key (from
$INFERD_API_KEY), --max-num-seqs 1 and --max-queue 1. Its last test sends SIGTERM, so it runs last in this file.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server_fixtures import InferdServer, log_tail, start_inferd_server, stop_inferd_server

API_KEY = "test-key-5f2c"
FILE_KEY = "file-key-81aa"
FLAG_KEY = "flag-key-0c3e"
CHAT = [{"role": "user", "content": "Say hello."}]
MB = 1 << 20


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param, error
    if param is not None:
        assert param in error["message"], error
    if code is not None:
        assert error["code"] == code
    return error


def assert_still_serving(http: httpx.Client, model: str, headers: dict[str, str] | None = None) -> None:
    response = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


@pytest.fixture(scope="module")
def http(inferd_server: InferdServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=inferd_server.base_url, timeout=300) as client:
        yield client


# ---------------------------------------------------------------------------------------------- bad bodies


def _bad_json_cases(model: str) -> list[tuple[str, str, Any, int, str | None]]:
    """(id, path, JSON body, status, param)"""
    chat = "/v1/chat/completions"
    completions = "/v1/completions"
    long_text = "hello " * 3000  # over the 2048-token context
    return [
        ("wrong-type-max_tokens", completions, {"model": model, "prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ("wrong-type-temperature", completions, {"model": model, "prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
        ("wrong-type-stream", chat, {"model": model, "messages": CHAT, "stream": "yes"}, 400, "stream"),
        ("wrong-type-messages", chat, {"model": model, "messages": "hello"}, 400, "messages"),
        ("wrong-type-prompt", completions, {"model": model, "prompt": 42}, 400, "prompt"),
        ("missing-messages", chat, {"model": model}, 400, "messages"),
        ("empty-messages", chat, {"model": model, "messages": []}, 400, "messages"),
        ("bad-role", chat, {"model": model, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ("image-content", chat, {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),  # noqa: E501
        ("empty-prompt", completions, {"model": model, "prompt": ""}, 400, "prompt"),
        ("empty-prompt-list", completions, {"model": model, "prompt": []}, 400, "prompt"),
        ("token-id-out-of-vocab", completions, {"model": model, "prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("negative-max_tokens", completions, {"model": model, "prompt": "Hi", "max_tokens": -5}, 400, "max_tokens"),
        ("zero-max_tokens", chat, {"model": model, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ("huge-max_tokens", completions, {"model": model, "prompt": "Hi", "max_tokens": 10**12}, 400, "max_tokens"),
        ("huge-max_completion_tokens", chat, {"model": model, "messages": CHAT, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),  # noqa: E501
        ("prompt-over-context", completions, {"model": model, "prompt": long_text}, 400, "prompt"),
        ("messages-over-context", chat, {"model": model, "messages": [{"role": "user", "content": long_text}]}, 400, "messages"),
        ("negative-temperature", chat, {"model": model, "messages": CHAT, "temperature": -1}, 400, "temperature"),
        ("top_p-zero", completions, {"model": model, "prompt": "Hi", "top_p": 0}, 400, "top_p"),
        ("n-zero", completions, {"model": model, "prompt": "Hi", "n": 0}, 400, "n"),
        ("top_logprobs-too-many", chat, {"model": model, "messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),  # noqa: E501
        ("top_logprobs-without-logprobs", chat, {"model": model, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        ("logprobs-too-many", completions, {"model": model, "prompt": "Hi", "logprobs": 50}, 400, "logprobs"),
        ("logit_bias-key", completions, {"model": model, "prompt": "Hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
        ("logit_bias-value", completions, {"model": model, "prompt": "Hi", "logit_bias": {"5": 1000}}, 400, "logit_bias"),
        ("min_tokens-over-max", completions, {"model": model, "prompt": "Hi", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),  # noqa: E501
        ("seed-not-integer", completions, {"model": model, "prompt": "Hi", "seed": 1.5}, 400, "seed"),
        ("body-not-object", completions, [1, 2, 3], 400, None),
        # Malformed structured-output and tool fields (tests/test_structured_server.py has the schema errors).
        ("response_format-type", chat, {"model": model, "messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),  # noqa: E501
        ("response_format-schema-name", chat, {"model": model, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}}, 400, "response_format"),  # noqa: E501
        ("tools-type", chat, {"model": model, "messages": CHAT, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, 400, "tools"),  # noqa: E501
        ("tool_choice-without-tools", chat, {"model": model, "messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),  # noqa: E501
        # Deprecated fields inferd does not honour are refused, not ignored.
        ("functions", chat, {"model": model, "messages": CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
        ("echo-on-chat", chat, {"model": model, "messages": CHAT, "echo": True}, 400, "echo"),
        ("stream_options-without-stream", chat, {"model": model, "messages": CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),  # noqa: E501
        ("stream_options-without-stream-completions", completions, {"model": model, "prompt": "Hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),  # noqa: E501
        ("user-content-null", chat, {"model": model, "messages": [{"role": "user", "content": None}]}, 400, "messages"),
        ("user-content-missing", chat, {"model": model, "messages": [{"role": "user"}]}, 400, "messages"),
    ]


@pytest.mark.parametrize("case_index", range(len(_bad_json_cases("m"))), ids=[c[0] for c in _bad_json_cases("m")])
def test_bad_json_bodies(http: httpx.Client, inferd_server: InferdServer, case_index: int) -> None:
    _, path, body, status, param = _bad_json_cases(inferd_server.model_name)[case_index]
    assert_openai_error(http.post(path, json=body), status, param)
    assert_still_serving(http, inferd_server.model_name)


@pytest.mark.parametrize(
    "content",
    [b'{"model": "x", "prompt": ', b"not json at all", b'{"prompt": "caf\xe9"}', b'{"prompt": "\xff\xfe\xfd"}'],
    ids=["truncated-json", "not-json", "latin1-not-utf8", "invalid-utf8"],
)
def test_malformed_bodies(http: httpx.Client, inferd_server: InferdServer, content: bytes) -> None:
    response = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)
    assert_still_serving(http, inferd_server.model_name)


@pytest.mark.parametrize(
    ("path", "content", "param"),
    [
        ("/v1/completions", b'{"model": "M", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        ("/v1/completions", b'{"model": "M", "prompt": ["ok", "\\udc00"], "max_tokens": 1}', "prompt"),
        ("/v1/chat/completions", b'{"model": "M", "messages": [{"role": "user", "content": "\\udbff"}]}', "messages"),
        ("/v1/chat/completions", b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}',
         "stop"),
        ("/tokenize", b'{"model": "M", "prompt": "x\\ud800"}', "prompt"),
    ],
    ids=["completion-prompt", "completion-prompt-list", "chat-content", "stop", "tokenize"],
)
def test_lone_surrogates_are_400_naming_the_field(
    http: httpx.Client, inferd_server: InferdServer, path: str, content: bytes, param: str
) -> None:
    content = content.replace(b'"M"', json.dumps(inferd_server.model_name).encode())
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, param)
    assert "surrogate" in response.json()["error"]["message"]
    # A proper pair (an emoji written as two escapes) is text, and is served.
    pair = b'{"model": "M", "prompt": "\\ud83d\\ude00", "max_tokens": 1}'.replace(
        b'"M"', json.dumps(inferd_server.model_name).encode()
    )
    assert http.post("/v1/completions", content=pair, headers={"Content-Type": "application/json"}).status_code == 200
    assert_still_serving(http, inferd_server.model_name)


def test_large_bodies_are_judged_as_small_ones(http: httpx.Client, inferd_server: InferdServer) -> None:
    """Bodies of 64 KiB and more are validated off the event loop (server/bodies.py); the answers are the same."""
    model = inferd_server.model_name
    padding = "x" * (80 << 10)
    assert_openai_error(http.post("/v1/completions", json={"model": model, "prompt": [1] * 40_000}), 400, "prompt")
    assert_openai_error(http.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "temperature": "hot",
                                                                "user": padding}), 400, "temperature")
    assert_openai_error(http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user"}],
                                                                "user": padding}), 400, "messages")
    truncated = b'{"model": "m", "prompt": "' + b"a" * (80 << 10)
    assert_openai_error(http.post("/v1/completions", content=truncated, headers={"Content-Type": "application/json"}), 400)
    ok = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                            "user": padding})
    assert ok.status_code == 200, ok.text
    small = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert ok.json()["choices"][0]["text"] == small.json()["choices"][0]["text"]
    assert_still_serving(http, model)


def test_unknown_model_is_404(http: httpx.Client, inferd_server: InferdServer) -> None:
    for path, body in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        assert_openai_error(http.post(path, json={"model": "no-such-model", **body}), 404, "model", "model_not_found")
    client = openai.OpenAI(base_url=f"{inferd_server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=inferd_server.model_name, messages=CHAT, max_tokens=-1)
    assert info.value.status_code == 400
    assert_still_serving(http, inferd_server.model_name)


def test_unknown_route_and_method(http: httpx.Client, inferd_server: InferdServer) -> None:
    assert_openai_error(http.get("/v1/no-such-route"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_10mb_body_is_413(http: httpx.Client, inferd_server: InferdServer) -> None:
    body = json.dumps({"model": inferd_server.model_name, "prompt": "a" * (10 * MB)}).encode()
    assert_openai_error(http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}), 413)
    assert_still_serving(http, inferd_server.model_name)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count what arrives
        for start in range(0, len(body), MB):
            yield body[start : start + MB]

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413)
    assert_still_serving(http, inferd_server.model_name)


def test_model_that_fails_to_load_exits_1(inferd_home: Path, tmp_path: Path) -> None:
    """Models load after uvicorn starts; a failure must end the process (status 1), not leave a 503 forever.
    A name that resolves to nothing is refused before the server starts (status 2, the usage-error status)."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "no-such"}')
    with pytest.raises(RuntimeError, match="exited with 1") as info:
        start_inferd_server(model=str(broken))
    assert "NoSuchForCausalLM" in str(info.value) or "no-such" in str(info.value)
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        start_inferd_server(model="no-such-model-anywhere")
    assert "unknown model 'no-such-model-anywhere'" in str(info.value)


# ---------------------------------------------------------------------------------------------- key, queue, drain


@pytest.fixture(scope="module")
def limited_server(inferd_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferdServer]:
    """Three API keys (environment, key file, flag), /metrics behind the key, a 3 s body-read timeout, one running
    sequence at most, one waiting request at most."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# one key per line\n\n{FILE_KEY}\n")
    server = start_inferd_server(
        ["--max-num-seqs", "1", "--max-queue", "1", "--drain-timeout", "120", "--api-key-file", str(key_file),
         "--api-key", FLAG_KEY, "--metrics-require-key", "--body-read-timeout", "3"],
        env={"INFERD_API_KEY": API_KEY},
        health_headers=_auth(),
    )
    try:
        yield server
    finally:
        stop_inferd_server(server.process)


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key(limited_server: InferdServer) -> None:
    model = limited_server.model_name
    with httpx.Client(base_url=limited_server.base_url, timeout=300) as http:
        for headers in ({}, _auth("wrong-key"), {"Authorization": API_KEY}):
            response = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}, headers=headers)
            assert_openai_error(response, 401, code="invalid_api_key")
        for headers in ({"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"}):
            assert_openai_error(http.get("/v1/models", headers=headers), 401)
        assert_openai_error(http.get("/v1/models"), 401)
        assert_openai_error(http.post("/tokenize", json={"prompt": "Hi"}), 401)
        assert http.get("/health").status_code == 200
        assert_openai_error(http.get("/metrics"), 401)  # --metrics-require-key
        assert http.get("/metrics", headers=_auth()).status_code == 200
        for key in (API_KEY, FILE_KEY, FLAG_KEY):  # every source of keys, any case of the scheme
            assert_still_serving(http, model, headers=_auth(key))
            assert http.get("/v1/models", headers={"Authorization": f"bearer {key}"}).status_code == 200
            assert http.get("/v1/models", headers={"Authorization": f"BEARER  {key}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{limited_server.base_url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{limited_server.base_url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [model]


def test_body_read_timeout_is_408_and_server_lives(limited_server: InferdServer) -> None:
    """A declared Content-Length longer than what arrives is answered 408 after --body-read-timeout (3 s)."""
    host, port = limited_server.base_url.removeprefix("http://").split(":")
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\": ").encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        waited_s = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"connection: close" in reply.lower()
    assert waited_s >= 2.5
    with httpx.Client(base_url=limited_server.base_url, timeout=300) as http:
        assert_still_serving(http, limited_server.model_name, headers=_auth())


def test_a_request_that_can_never_fit_the_queue_is_400_not_429(limited_server: InferdServer) -> None:
    body = {"model": limited_server.model_name, "prompt": ["one", "two"], "max_tokens": 1}  # --max-queue 1
    with httpx.Client(base_url=limited_server.base_url, timeout=300) as http:
        error = assert_openai_error(http.post("/v1/completions", json=body, headers=_auth()), 400, "prompt")
        assert "max_queue" in error["message"]
        assert_still_serving(http, limited_server.model_name, headers=_auth())


def test_queue_limit_429(limited_server: InferdServer) -> None:
    model = limited_server.model_name
    body = {"model": model, "prompt": "Count to one hundred:", "max_tokens": 64, "temperature": 0, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limited_server.base_url, timeout=600, headers=_auth()) as http:
            return list(await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(8))))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    # One sequence runs and one may wait: at most two of eight are admitted, at least one is.
    assert 1 <= statuses.count(200) <= 2, statuses
    for response in responses:
        if response.status_code == 429:
            assert_openai_error(response, 429, code="rate_limit_exceeded")
            assert int(response.headers["Retry-After"]) >= 1
        else:
            assert response.json()["usage"]["completion_tokens"] == 64
    with httpx.Client(base_url=limited_server.base_url, timeout=300) as http:
        assert_still_serving(http, model, headers=_auth())

    # The openai client maps the 429 to its RateLimitError (no retries here).
    async def flood() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{limited_server.base_url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=600) as client:  # fmt: skip
            calls = (client.completions.create(model=model, prompt=body["prompt"], max_tokens=64, temperature=0,
                                               extra_body={"ignore_eos": True}) for _ in range(8))  # fmt: skip
            return list(await asyncio.gather(*calls, return_exceptions=True))

    results = asyncio.run(flood())
    assert any(isinstance(r, openai.RateLimitError) for r in results), results
    assert all(isinstance(r, openai.RateLimitError) or r.usage.completion_tokens == 64 for r in results), results


def test_a_stream_cut_by_the_drain_timeout_ends_with_an_error_event_and_done(inferd_home: Path) -> None:
    server = start_inferd_server(["--drain-timeout", "1"])
    try:
        body = {"model": server.model_name, "prompt": "Count to one thousand:", "max_tokens": 1500, "temperature": 0,
                "stream": True, "ignore_eos": True}  # fmt: skip
        events: list[str] = []
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=300) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if len(events) == 2:
                    server.process.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "drain timeout" in error["message"] and error["type"] == "server_error"
        assert all("choices" in json.loads(e) for e in events[:-2])
        assert server.process.wait(60) == 0
        assert "Traceback" not in log_tail(server.process, 200_000)
    finally:
        stop_inferd_server(server.process)


def test_sigterm_drains_stream_and_exits_0(limited_server: InferdServer) -> None:
    """Runs last in this module: the server exits."""
    model = limited_server.model_name
    process = limited_server.process
    # Let any request of the previous test still running finish first (max_num_seqs is 1).
    with httpx.Client(base_url=limited_server.base_url, timeout=300) as http:
        deadline = time.monotonic() + 300
        while not _is_idle(http.get("/metrics", headers=_auth()).text):
            assert time.monotonic() < deadline, "server never became idle"
            time.sleep(0.1)
    body = {"model": model, "prompt": "Count to one hundred:", "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[str] = []
    with httpx.stream("POST", f"{limited_server.base_url}/v1/completions", json=body, headers=_auth(), timeout=300) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                break
        process.send_signal(signal.SIGTERM)
        # Draining: new requests are refused with 503, the health probe says so.
        with httpx.Client(base_url=limited_server.base_url, timeout=30) as http:
            deadline = time.monotonic() + 30
            while http.get("/health").status_code == 200:
                assert time.monotonic() < deadline, "server did not start draining"
                time.sleep(0.02)
            refused = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1}, headers=_auth())
            assert_openai_error(refused, 503)
        for line in lines:
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [choice["finish_reason"] for c in chunks for choice in c["choices"] if choice["finish_reason"]] == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    assert process.wait(timeout=120) == 0, log_tail(process)


def _is_idle(metrics_text: str) -> bool:
    for line in metrics_text.splitlines():
        if line.startswith("inferd:num_requests_running{") or line.startswith("inferd:num_requests_waiting{"):
            if float(line.rsplit(" ", 1)[1]) != 0.0:
                return False
    return True
