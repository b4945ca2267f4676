"""OIP infer answered inside the HTTP protocol (server/fast_http.py) against the same server answering it through
uvicorn's ASGI cycle (`INFERD_HOT_ROUTES=0`, the reference: FastAPI's guard and the route's ASGI handler).

Two real `inferd serve --model-repository` subprocesses with the same flags (an API key, a 4 KiB body limit, a 1 s
body timeout) get the same raw bytes over plain sockets: good requests, every guard refusal, malformed HTTP
bodies, pipelined requests mixing hot and ordinary routes, `Connection: close` and HTTP/1.0. Status, headers
(but the date) and body must be the same, and the connection must end the same way.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.server_fixtures import stop_inferd_server
from tests.tabular_fixtures import build_repository, train
from tests.test_oip import OIPServer, start_oip_server

API_KEY = "fast-path-key"
MAX_BODY_BYTES = 4096
SERVER_ARGS = ("--api-key", API_KEY, "--max-body-bytes", str(MAX_BODY_BYTES), "--body-read-timeout", "1")
HOT_LOG_LINE = "OIP infer is answered inside the HTTP protocol"


class Reply(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]  # lower-case names, sorted, without the date
    body: bytes


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[tuple[OIPServer, OIPServer]]:
    """(hot, reference) over one repository."""
    repo = build_repository(tmp_path_factory.mktemp("fast_http"), train(num_train_rows=4000, num_trees=20))
    hot = start_oip_server(repo, SERVER_ARGS)
    try:
        reference = start_oip_server(repo, SERVER_ARGS, {"INFERD_HOT_ROUTES": "0"})
        try:
            yield hot, reference
        finally:
            stop_inferd_server(reference.process)
    finally:
        stop_inferd_server(hot.process)


def _address(server: OIPServer) -> tuple[str, int]:
    host, port = server.http_url.split(":")
    return host, int(port)


def _read_reply(sock: socket.socket, buffer: bytearray) -> Reply | None:
    """One HTTP/1.1 response from `sock` (bytes already read in `buffer`); None if the connection closed first."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    length = int(next(value for name, value in headers if name.lower() == "content-length"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed inside a body ({len(rest)} of {length} bytes)")
        rest += chunk
    buffer[:] = rest[length:]
    kept = tuple(sorted((name.lower(), value) for name, value in headers if name.lower() != "date"))
    return Reply(status, kept, rest[:length])


def _exchange(server: OIPServer, raw: bytes, num_replies: int, *, timeout_s: float = 10.0,
              ) -> tuple[list[Reply], bool]:
    """Send `raw` on one connection, read `num_replies` replies; (replies, whether the server then closed)."""
    with socket.create_connection(_address(server), timeout=timeout_s) as sock:
        sock.sendall(raw)
        buffer = bytearray()
        replies = []
        for _ in range(num_replies):
            reply = _read_reply(sock, buffer)
            assert reply is not None, f"the connection closed after {len(replies)} of {num_replies} replies"
            replies.append(reply)
        sock.settimeout(0.5)
        try:
            is_closed = sock.recv(1) == b""
        except TimeoutError:
            is_closed = False
    return replies, is_closed


def _request(path: str, body: bytes, *, key: str | None = API_KEY, extra: str = "", version: str = "1.1",
             content_length: int | None = None) -> bytes:
    head = f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
    if key is not None:
        head += f"Authorization: Bearer {key}\r\n"
    head += extra
    if "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body) if content_length is None else content_length}\r\n"
    return head.encode() + b"\r\n" + body


def _body(row_id: str = "r1", *, data: list[float] | None = None, shape=(1, 12)) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(shape), "data": data or [0.5] * 12}
    return json.dumps({"id": row_id, "inputs": [tensor]}).encode()


INFER = "/v2/models/xgb_fraud/infer"


def _binary_request() -> bytes:
    """One row of 0.5s as OIP binary tensor data: a JSON header, then 12 little-endian float32."""
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 12],
                                     "parameters": {"binary_data_size": 48}}]}).encode()
    return _request(INFER, header + struct.pack("<12f", *[0.5] * 12),
                    extra=f"Inference-Header-Content-Length: {len(header)}\r\n")


# Each case: (name, raw bytes of one or more requests, number of replies)
CASES: list[tuple[str, bytes, int]] = [
    ("json", _request(INFER, _body()), 1),
    ("versioned path", _request("/v2/models/xgb_fraud/versions/1/infer", _body("v")), 1),
    ("query string", _request(INFER + "?x=1", _body("q")), 1),
    ("requested output", _request(INFER, json.dumps({"inputs": [json.loads(_body())["inputs"][0]],
                                                     "outputs": [{"name": "probabilities"}]}).encode()), 1),
    ("binary output", _request(INFER, json.dumps({"inputs": [json.loads(_body())["inputs"][0]], "outputs": [
        {"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()), 1),
    ("binary input", _binary_request(), 1),
    ("wrong shape", _request(INFER, _body(shape=(1, 11), data=[0.5] * 11)), 1),
    ("wrong element count", _request(INFER, _body(shape=(2, 12))), 1),
    ("malformed json", _request(INFER, b'{"inputs": ['), 1),
    ("empty body", _request(INFER, b""), 1),
    ("unknown model", _request("/v2/models/nope/infer", _body()), 1),
    ("unknown version", _request("/v2/models/xgb_fraud/versions/9/infer", _body()), 1),
    ("no api key", _request(INFER, _body(), key=None), 1),
    ("wrong api key", _request(INFER, _body(), key="nope"), 1),
    ("declared length over the limit", _request(INFER, b"", content_length=MAX_BODY_BYTES + 1), 1),
    ("chunked body over the limit", _request(INFER, b"", extra="Transfer-Encoding: chunked\r\n")
     + b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n", 1),
    ("chunked body", _request(INFER, b"", extra="Transfer-Encoding: chunked\r\n")
     + b"%x\r\n" % len(_body("c")) + _body("c") + b"\r\n0\r\n\r\n", 1),
    ("content-length not a number", _request(INFER, b"{}", content_length=None).replace(
        b"Content-Length: 2", b"Content-Length: two"), 1),
    ("not utf-8", _request(INFER, b'{"id": "\xff", "inputs": []}'), 1),
    ("lone surrogate", _request(INFER, _body("\\ud800").replace(b"\\\\ud800", b"\\ud800")), 1),
    ("pipelined, hot and ordinary routes in order",
     _request(INFER, _body("p1")) + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
     + _request(INFER, _body("p2", data=[3.0] * 12)) + _request("/v2/models/nope/infer", _body("p3"))
     + _request("/v2/repository/index", b"{}") + _request(INFER, _body("p4")), 6),
    ("connection close", _request(INFER, _body("cc"), extra="Connection: close\r\n"), 1),
    ("http/1.0", _request(INFER, _body("h10"), version="1.0"), 1),
    ("http/1.0 keep-alive", _request(INFER, _body("h10k"), version="1.0", extra="Connection: keep-alive\r\n"), 1),
]


def test_the_hot_server_answers_infer_inside_the_protocol(servers):
    hot, reference = servers
    assert HOT_LOG_LINE in Path(hot.process.log_path).read_text()
    assert HOT_LOG_LINE not in Path(reference.process.log_path).read_text()


@pytest.mark.parametrize(("name", "raw", "num_replies"), CASES, ids=[case[0] for case in CASES])
def test_same_replies_as_the_asgi_path(servers, name, raw, num_replies):
    hot, reference = servers
    hot_replies, hot_closed = _exchange(hot, raw, num_replies)
    reference_replies, reference_closed = _exchange(reference, raw, num_replies)
    assert hot_replies == reference_replies
    assert hot_closed == reference_closed
    if name.startswith("pipelined"):  # in order: each answer carries its own request's id
        ids = [json.loads(r.body).get("id") for r in hot_replies if r.status == 200 and r.body.startswith(b'{"model')]
        assert ids == ["p1", "p2", "p4"]


def test_a_body_that_never_arrives_gets_408_and_the_connection_closes(servers):
    for server in servers:
        started = time.monotonic()
        replies, is_closed = _exchange(server, _request(INFER, b'{"inputs"', content_length=200), 1)
        assert replies[0].status == 408 and b"did not arrive within 1 s" in replies[0].body
        assert is_closed and time.monotonic() - started < 8
    hot, reference = servers
    assert _exchange(hot, _request(INFER, b"{", content_length=9), 1)[0] == \
        _exchange(reference, _request(INFER, b"{", content_length=9), 1)[0]


def test_many_requests_on_one_connection_and_the_server_keeps_serving(servers):
    hot, reference = servers
    raw = b"".join(_request(INFER, _body(f"k{i}", data=[float(i % 7)] * 12)) for i in range(200))
    hot_replies, _ = _exchange(hot, raw, 200)
    reference_replies, _ = _exchange(reference, raw, 200)
    assert hot_replies == reference_replies
    assert [json.loads(r.body)["id"] for r in hot_replies] == [f"k{i}" for i in range(200)]


def test_a_client_that_sends_without_reading_gets_every_answer_in_order(servers):
    """Thousands of pipelined requests from a client that reads nothing for two seconds (its answers back up in
    the kernel and the transport, which pauses writing: fast_http.py then waits for the drain, as uvicorn's send
    does), then reads: every answer comes, in order, the same as the ASGI path's."""
    num_requests, num_rows = 1500, 64  # ~3.9 KB per request, ~2.8 KB per answer: 4 MB of answers
    raw = b"".join(_request(INFER, _body(f"w{i}", data=[0.5] * 12 * num_rows, shape=(num_rows, 12)))
                   for i in range(num_requests))
    answers = []
    for server in servers:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(120)
            sock.connect(_address(server))
            sender = threading.Thread(target=sock.sendall, args=(raw,), daemon=True)
            sender.start()
            time.sleep(2.0)
            buffer = bytearray()
            replies = [_read_reply(sock, buffer) for _ in range(num_requests)]
            sender.join(timeout=60)
        assert [json.loads(r.body)["id"] for r in replies] == [f"w{i}" for i in range(num_requests)]
        answers.append(replies)
    assert answers[0] == answers[1]
