"""Schema-driven fuzzing of a real `inferd serve` (schemathesis over the server's own /openapi.json).

Every operation of the schema gets generated requests, valid and invalid (schemathesis' positive and negative
modes), bounded in number so the suite stays within a few minutes; the server must never answer 5xx, and after
the run it must still serve. A small context (--max-model-len 32) keeps each generated completion short.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from server_fixtures import InferdServer, start_inferd_server, stop_inferd_server

MAX_EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzz_server(inferd_home: Path) -> Iterator[InferdServer]:
    server = start_inferd_server(["--max-model-len", "32", "--max-queue", "64"])
    try:
        yield server
    finally:
        stop_inferd_server(server.process)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: InferdServer):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


# The operations with a request body: where generated input can reach the engine. (Their list comes from the
# schema itself; the test fails if the schema ever loses one of them.)
FUZZED_OPERATIONS = ("POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "POST /detokenize")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("operation_label", FUZZED_OPERATIONS)
def test_no_request_gets_a_5xx(api_schema, fuzz_server: InferdServer, operation_label: str, mode: GenerationMode) -> None:
    operations = {op.label: op for op in (result.ok() for result in api_schema.get_all_operations())}
    assert operation_label in operations, sorted(operations)
    operation = operations[operation_label]
    statuses: list[int] = []

    @settings(max_examples=MAX_EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        response = case.call(base_url=fuzz_server.base_url, timeout=120)
        statuses.append(response.status_code)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
            f"{case.as_curl_command()}"
        )

    check()
    assert statuses, "no request was generated"
    if mode is GenerationMode.NEGATIVE:  # invalid by the schema: the server must say so
        assert all(400 <= status < 500 for status in statuses), statuses


def test_server_still_serves_after_fuzzing(fuzz_server: InferdServer) -> None:
    with httpx.Client(base_url=fuzz_server.base_url, timeout=120) as http:
        response = http.post("/v1/completions", json={"model": fuzz_server.model_name, "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert http.get("/health").status_code == 200
