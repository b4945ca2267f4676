"""Keep-alive (Ollama's idea): an idle model is unloaded, and the next request loads it again and waits.

A real `inferd serve --keep-alive 1s`; the reference for the reloaded model is the same server's greedy answer
before the unload (and the engine's own greedy parity with transformers is tested elsewhere).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_fixtures import InferdServer, start_inferd_server, stop_inferd_server

BODY = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def sleepy_server(inferd_home: Path) -> Iterator[InferdServer]:
    server = start_inferd_server(["--keep-alive", "1s"])
    try:
        yield server
    finally:
        stop_inferd_server(server.process)


def _model_status(http: httpx.Client, model: str) -> str:
    return http.get("/health").json()["models"][model]["status"]


def _wait_for_status(http: httpx.Client, model: str, status: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _model_status(http, model) != status:
        assert time.monotonic() < deadline, f"model never became {status!r}"
        time.sleep(0.1)


def _metric(http: httpx.Client, line_start: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting with {line_start!r}")


def test_idle_model_unloads_and_the_next_request_reloads_it(sleepy_server: InferdServer) -> None:
    model = sleepy_server.model_name
    with httpx.Client(base_url=sleepy_server.base_url, timeout=600) as http:
        first = http.post("/v1/completions", json={"model": model, **BODY})
        assert first.status_code == 200, first.text
        _wait_for_status(http, model, "idle")
        assert http.get("/health").status_code == 200  # asleep is healthy: it loads on demand
        assert _metric(http, f'inferd:model_loaded{{model_name="{model}"}}') == 0.0
        second = http.post("/v1/completions", json={"model": model, **BODY})  # waits for the reload, no 503
        assert second.status_code == 200, second.text
        assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert _metric(http, f'inferd:model_load_seconds_count{{model_name="{model}"}}') == 2.0


def test_a_request_longer_than_the_keep_alive_is_not_cut(sleepy_server: InferdServer) -> None:
    model = sleepy_server.model_name
    body = {"model": model, "prompt": "Count:", "max_tokens": 1024, "temperature": 0, "ignore_eos": True,
            "speculative": False}  # one token per step: seconds of work on any CPU
    with httpx.Client(base_url=sleepy_server.base_url, timeout=600) as http:
        started = time.monotonic()
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 1024
        if time.monotonic() - started < 1.5:
            pytest.fail("the request finished within the keep-alive; the test proves nothing on so fast a machine: "
                        "raise max_tokens")
        _wait_for_status(http, model, "idle")


def test_a_requests_keep_alive_becomes_the_models(sleepy_server: InferdServer) -> None:
    """Ollama's per-request keep_alive through the routes: -1 keeps the model loaded past the server's 1 s, then 0
    unloads it as soon as it is idle."""
    model = sleepy_server.model_name
    with httpx.Client(base_url=sleepy_server.base_url, timeout=600) as http:
        pinned = http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "keep_alive": -1})
        assert pinned.status_code == 200, pinned.text
        time.sleep(4.0)  # four times the server's --keep-alive
        assert _model_status(http, model) == "ready"
        released = http.post("/v1/completions", json={"model": model, **BODY, "keep_alive": 0})
        assert released.status_code == 200, released.text
        _wait_for_status(http, model, "idle", timeout_s=30)
        bad = http.post("/v1/completions", json={"model": model, **BODY, "keep_alive": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive", bad.text
