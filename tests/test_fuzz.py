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
from hypothesis import HealthCheck, settings

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


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_5xx(case, fuzz_server: InferdServer) -> None:
    response = case.call(base_url=fuzz_server.base_url, timeout=120)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n{case.as_curl_command()}"
    )


def test_server_still_serves_after_fuzzing(fuzz_server: InferdServer) -> None:
    with httpx.Client(base_url=fuzz_server.base_url, timeout=120) as http:
        response = http.post("/v1/completions", json={"model": fuzz_server.model_name, "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert http.get("/health").status_code == 200
