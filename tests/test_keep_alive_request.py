"""A request's `keep_alive` (Ollama's semantics) as the body carries it and as the model table applies it:
durations like Ollama's ("5m", "30s", seconds), a negative value keeps the model loaded, a bad value is a 400
naming `keep_alive`. (The chat/completions routes call `state.apply_keep_alive(served, body.keep_alive)`.)"""

from __future__ import annotations

import pytest

from inferd.server.errors import APIError
from inferd.server.protocol import ChatCompletionRequest, CompletionRequest
from inferd.server.state import ServedModel, ServerOptions, ServerState
from inferd.serving import ModelKind, ModelSpec


@pytest.fixture()
def served() -> tuple[ServerState, ServedModel]:
    state = ServerState(ServerOptions(keep_alive_s=60.0))
    (row,) = state.add_models([ModelSpec("m", "/nonexistent", ModelKind.EMBED)])
    return state, row


@pytest.mark.parametrize(("value", "seconds"), [("5m", 300.0), ("30s", 30.0), (0, 0.0), (2.5, 2.5), ("-1", None),
                                                (-1, None)])
def test_keep_alive_of_a_request_becomes_the_models(served, value, seconds) -> None:
    state, row = served
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "keep_alive": value})
    state.apply_keep_alive(row, body.keep_alive)
    assert row.keep_alive_s == seconds


def test_absent_keep_alive_leaves_the_model_as_it_was(served) -> None:
    state, row = served
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    state.apply_keep_alive(row, body.keep_alive)
    assert row.keep_alive_s == 60.0


def test_bad_keep_alive_is_a_400_naming_the_field(served) -> None:
    state, row = served
    with pytest.raises(APIError) as info:
        state.apply_keep_alive(row, "soon")
    assert info.value.status_code == 400 and info.value.param == "keep_alive"
