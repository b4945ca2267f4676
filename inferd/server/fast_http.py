"""Layer 5: hot routes answered inside the HTTP protocol, without an ASGI request cycle.

A one-row OIP infer costs the server ~90 µs of one core, and the model's share of it is ~5 µs: the rest is HTTP.
uvicorn's httptools protocol hands every request to the app as an ASGI cycle (a scope dict, receive/send
coroutines with message dicts, the middleware stack) and writes the status line with headers and the body in two
`transport.write` calls, i.e. two `send` system calls. `HotRouteProtocol` is that protocol with one change: a
request whose method and path match a registered hot route is answered in place. Its body is collected by the
parser callbacks, the guard's own checks run (the same methods GuardMiddleware asks: API key, drain, body size,
body timeout, UTF-8), the route's answer function runs in one task, and the answer goes out in one write.
Everything else (other paths, `Expect: 100-continue`, upgrades, percent-encoded paths) takes uvicorn's usual path
unchanged, and requests pipelined on one connection are answered in order whichever path each takes, through
uvicorn's own pipeline queue.

    hot_protocol_class(routes, guard) -> type   a uvicorn `http=` protocol class answering `routes` itself
    HotRoute(pattern, answer, what)             a path regex over the raw path and its answer function

It builds on uvicorn's HttpToolsProtocol internals (its `cycle`, `pipeline`, `flow`, `on_response_complete`);
`hot_protocol_class` returns None where those are not what this module was written against (no httptools, or an
untested uvicorn), and `inferd serve` then runs uvicorn's own protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("inferd.server")

# (status, body, headers) of an answered request; the route's answer function returns it.
Answer = tuple[int, bytes, dict[str, str]]
# answer(path_match, body, headers) for a request that passed the guard
AnswerFunction = Callable[["re.Match[bytes]", bytes, Sequence[tuple[bytes, bytes]]], Awaitable[Answer]]


@dataclass(frozen=True)
class HotRoute:
    """POST requests whose raw path fully matches `pattern` (bytes) are answered by `answer`. `error_body` shapes
    the guard's refusals and the 500 of an answer that raised, as the route's clients read errors."""

    pattern: re.Pattern[bytes]
    answer: AnswerFunction
    what: str  # for the log line of a failed answer
    error_body: Callable[[int, str, str | None, str | None], bytes]


def oip_error_body(_status: int, message: str, _param: str | None, _code: str | None) -> bytes:
    """OIP v2's error shape, as JSONResponse({"error": message}) renders it."""
    return json.dumps({"error": message}, ensure_ascii=False, separators=(",", ":")).encode()


class _NoEvent:
    """uvicorn's protocol sets `cycle.message_event` on disconnect; a hot cycle waits on no event."""

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


def hot_protocol_class(routes: Sequence[HotRoute], guard: Any) -> type | None:
    """A protocol class for `uvicorn.Config(http=...)` that answers `routes` itself, behind `guard` (a
    GuardMiddleware: its refusals and `state`); None if uvicorn's httptools protocol is not available as expected."""
    try:  # imports httptools itself: an ImportError when it is not installed
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:
        return None
    required = ("on_headers_complete", "on_body", "on_message_complete", "on_response_complete", "_start_asgi_task",
                "data_received", "shutdown")
    if not all(hasattr(HttpToolsProtocol, name) for name in required):
        return None
    state = guard.state
    body_timeout_s = state.options.body_read_timeout_s
    max_body_bytes = state.options.max_body_bytes

    class HotCycle:
        """One hot request on one connection: its body, then its answer, written once. The attributes uvicorn's
        protocol reads on its current cycle (`response_complete`, `keep_alive`, `disconnected`, `message_event`)
        keep its pipelining, shutdown and disconnect handling working unchanged."""

        __slots__ = ("protocol", "route", "match", "headers", "keep_alive", "disconnected", "response_complete",
                     "is_answered", "body", "is_body_complete", "is_turn", "is_started", "refusal", "timer")
        message_event = _NO_EVENT

        def __init__(self, protocol: Any, route: HotRoute, match: re.Match[bytes], headers: list[tuple[bytes, bytes]],
                     keep_alive: bool) -> None:
            self.protocol = protocol
            self.route = route
            self.match = match
            self.headers = headers
            self.keep_alive = keep_alive
            self.disconnected = False
            self.response_complete = False  # answer written and drained: the connection's next request may start
            self.is_answered = False  # answer written (the rest of the body, if any, is not kept)
            self.body = bytearray()
            self.is_body_complete = False
            self.is_turn = False
            self.is_started = False
            self.timer: asyncio.TimerHandle | None = None
            # Checked now, answered in turn: a refused request's body is not kept.
            self.refusal = guard.declared_length_refusal(headers)

        def add_body(self, chunk: bytes) -> None:
            if self.refusal is not None or self.is_answered:
                return  # uvicorn's parser still reads the rest of the body, to keep the connection usable
            self.body += chunk
            if len(self.body) > max_body_bytes:  # chunked transfer, or a Content-Length that lied
                self.refusal = guard.too_large()
                self.body = bytearray()
                self._start_if_ready()

        def complete_body(self) -> None:
            self.is_body_complete = True
            self._start_if_ready()

        def take_turn(self) -> None:
            """Called when the answers of the connection's earlier requests have gone out."""
            self.is_turn = True
            self._start_if_ready()

        def _start_if_ready(self) -> None:
            if not self.is_turn or self.is_started:
                return
            access = guard.access_refusal(self.route_path(), self.headers)
            if access is not None:  # 401/503 without waiting for the body, as the guard answers them
                self.is_started = True
                self.write_refusal(access)
                return
            if self.refusal is not None:  # 413 at once, as the guard answers it: the rest of the body is not read
                self._stop_timer()
                self.is_started = True
                self.write_refusal(self.refusal)
                return
            if not self.is_body_complete:
                if self.timer is None:
                    self.timer = self.protocol.loop.call_later(body_timeout_s, self._body_timed_out)
                return
            self._stop_timer()
            self.is_started = True
            task = self.protocol.loop.create_task(self._run())
            tasks = self.protocol.tasks  # uvicorn's shutdown waits for these
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def _stop_timer(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def route_path(self) -> str:
            return self.match.string.decode("latin-1")

        def _body_timed_out(self) -> None:
            self.timer = None
            if not self.is_started:
                self.is_started = True
                self.write_refusal(guard.body_timeout())

        async def _run(self) -> None:
            state.num_in_flight += 1
            try:
                body = bytes(self.body)
                self.body = bytearray()
                refusal = await guard.text_refusal(body, self.headers)
                if refusal is not None:
                    self.write_refusal(refusal)
                    return
                status, payload, headers = await self.route.answer(self.match, body, self.headers)
            except Exception as exc:  # noqa: BLE001 - a failed answer is a 500 to its client, never a lost request
                logger.exception("%s failed", self.route.what)
                self.keep_alive = False
                self.write(500, self.route.error_body(
                    500, f"internal server error: {type(exc).__name__}: {exc}", None, None),
                    {"content-type": "application/json"})
                return
            finally:
                state.num_in_flight -= 1
            self.write(status, payload, headers)

        def write_refusal(self, refusal: Any) -> None:
            headers = {"content-type": "application/json", **(refusal.headers or {})}
            if any(name.lower() == "connection" and value.lower() == "close" for name, value in headers.items()):
                self.keep_alive = False
            self.write(refusal.status, self.route.error_body(refusal.status, refusal.message, refusal.param,
                                                             refusal.code), headers)  # fmt: skip

        def write(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
            """The whole answer in one write, then uvicorn's own completion: keep-alive timer or the next
            pipelined request."""
            protocol = self.protocol
            self.is_answered = True
            if self.disconnected or protocol.transport.is_closing():
                self.response_complete = True
                return
            parts = [STATUS_LINE[status]]
            for name, value in protocol.server_state.default_headers:
                parts += [name, b": ", value, b"\r\n"]
            for name, value in headers.items():
                if name.lower() != "connection":
                    parts += [name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n"]
            parts += [b"content-length: ", str(len(payload)).encode(), b"\r\n"]
            if not self.keep_alive:
                parts.append(b"connection: close\r\n")
            parts += [b"\r\n", payload]
            protocol.transport.write(b"".join(parts))
            if protocol.flow.write_paused and self.keep_alive:
                # A client that sends but does not read: its next request waits (queued, reading paused) until the
                # answers drain, as uvicorn's send waits, so unread answers cannot pile up in memory.
                task = protocol.loop.create_task(self._complete_after_drain())
                protocol.tasks.add(task)
                task.add_done_callback(protocol.tasks.discard)
                return
            self._complete()

        async def _complete_after_drain(self) -> None:
            await self.protocol.flow.drain()  # also released when the connection is lost
            self._complete()

        def _complete(self) -> None:
            self.response_complete = True
            if not self.keep_alive:
                self.protocol.transport.close()
            self.protocol.on_response_complete()

    class HotRouteProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol answering `routes` in place (module docstring)."""

        def on_headers_complete(self) -> None:
            parser = self.parser
            if parser.get_method() == b"POST" and not self.expect_100_continue and not parser.should_upgrade():
                raw_path = self.url.partition(b"?")[0]
                if b"%" not in raw_path:  # percent-encoded paths: uvicorn decodes them (its path)
                    for route in routes:
                        match = route.pattern.fullmatch(raw_path)
                        if match is not None:
                            self._begin_hot(route, match)
                            return
            super().on_headers_complete()

        def _begin_hot(self, route: HotRoute, match: re.Match[bytes]) -> None:
            keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
            cycle = HotCycle(self, route, match, self.headers, keep_alive)
            existing_cycle = self.cycle
            self.cycle = cycle  # type: ignore[assignment]
            if existing_cycle is None or existing_cycle.response_complete:
                cycle.take_turn()
            else:  # pipelined behind an answer still to go out: uvicorn's queue, started in order
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            if type(cycle) is HotCycle:
                cycle.take_turn()
            else:
                super()._start_asgi_task(cycle, app)

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if type(cycle) is HotCycle:
                cycle.add_body(body)
            else:
                super().on_body(body)

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if type(cycle) is HotCycle:
                cycle.complete_body()
            else:
                super().on_message_complete()

    return HotRouteProtocol
