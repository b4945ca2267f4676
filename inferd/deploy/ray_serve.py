"""Layer 6: inferd on Ray Serve, the only module that imports ray (`pip install 'inferd[ray]'`).

    inferd serve --ray --model smollm2-135m-instruct --min-replicas 0 --max-replicas 2
    inferd deploy ray deploy.yaml                                   (deploy/config.py's format)
    serve run inferd.deploy.ray_serve:build_app config=deploy.yaml  (Ray's own CLI, same builder)

The application, for a model table of N models:

    Ray Serve proxy (HTTP) -> InferdIngress (one replica, FastAPI) -> ModelReplica deployment of model `model`
                                        |                                (one per model, autoscaled: 0..max)
                                        +-> MetricsBoard (one replica): each model replica's /metrics text

- `ModelReplica` runs inferd's own app (server/app.py: same routes, validation, errors, metrics) with one model,
  in process; a forwarded request is one ASGI call whose messages stream back through a Ray generator.
- One hop (`is_one_hop`): one model, always a replica, no affinity routing to do: there is no ingress, Serve's
  proxy calls the model's replicas (`ModelIngressReplica`) directly. Half the Ray messages per streamed token;
  no retry on another replica and no SSE error event when a replica dies (the proxy's 500, a closed connection).
- Streams: a replica passes a streamed answer's chunks to Ray through `CoalescingSend`: those produced within
  DeploymentOptions.stream_interval_ms (50) of its last message go as one message (whole SSE events, in order; the
  first after a quiet gap at once), and the replica's `StreamBudget` (DeploymentOptions.stream_messages_per_s, 80)
  widens every open stream's interval to open streams / budget when that is longer (16 streams: 200 ms). Ray's
  per-message cost (pickling, a generator item report, the proxy's receive) is paid per message, not per byte.
- `InferdIngress` reads `model` from the JSON body (or the OIP path `/v2/models/{name}/...`), picks that model's
  deployment handle, and relays the answer. It answers /health, /v1/models and /metrics itself.
- Scale to zero: with min_replicas 0 a model with no traffic for downscale_delay_s has no replica; the next
  request waits at the handle while Ray starts one (prepared weights make its load short: models/prepared.py).
  Ray learns of the waiting request within metrics_interval_s (DeploymentOptions: 0.5 s).
- Prefix affinity: generate deployments route with Ray Serve LLM's PrefixCacheAffinityRouter on `prompt` (the
  chat messages' text or the completion prompt): a request prefers the replica that already served its longest
  prefix (its KV blocks are in that replica's prefix cache), unless queue lengths differ by more than
  prefix_imbalance_threshold; then power of two choices takes the less loaded replica.
- No truncated 200: a non-streaming answer is relayed only once complete; if the replica dies first (SIGKILL,
  node loss) the ingress retries on another replica (nothing was sent yet), and after `MAX_ATTEMPTS` answers 503
  with Retry-After. A stream whose replica dies after its first bytes ends with an SSE error event (what
  the OpenAI client raises as an APIError), then `data: [DONE]`.
- Drain: a replica being stopped (downscale, redeploy) takes no new request and lets in-flight ones (streams
  included) finish for up to graceful_shutdown_timeout_s.
- /metrics: every model replica pushes its Prometheus text to the MetricsBoard every METRICS_PUSH_PERIOD_S; the
  ingress serves all of them with a `replica` label added to every sample.
"""


import asyncio
import json
import logging
import os
import signal
import time
import warnings
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.responses import JSONResponse, Response, StreamingResponse

from inferd.deploy.config import DeployConfig, DeploymentOptions, merge_exposition, read_deploy_config
from inferd.server.errors import error_body
from inferd.server.state import ServerOptions
from inferd.serving import ModelKind, ModelSpec

# Under Serve's own logger, so that these lines reach each replica's log file (/tmp/ray/session_latest/logs/serve/).
logger = logging.getLogger("ray.serve.inferd")

APP_NAME = "inferd"
MAX_ATTEMPTS = 3  # a request whose replica died before any byte was relayed is sent again, this many times in all
RETRY_BACKOFF_S = 0.5
REPLICA_HEADER = "x-inferd-replica"
# Each push renders the replica's whole /metrics text and sends it through Ray: at 1 s that was 0.1-0.4 ms of CPU per
# generated token on 2 cores (benchmarks/ray_serve.py's CPU split), for series that change no faster than a scrape.
METRICS_PUSH_PERIOD_S = 5.0
METRICS_STALE_S = 15.0  # a replica that has not pushed for this long (killed) drops out of /metrics
# A stopping replica's farewell to the board: when the whole application is deleted the board may have no replica
# left, and a handle call to a deployment without replicas waits forever (the replica then sat out its whole
# graceful_shutdown_timeout_s before Ray killed it).
BOARD_DROP_TIMEOUT_S = 1.0
# What a replica dying under a request looks like at the handle.
_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

# Ray starts its worker processes (Serve's proxy and controller, every replica) at niceness 15, below the raylet and
# every ordinary process: on a machine shared with anything at niceness 0 (a load generator, another server) a
# replica then gets a sliver of a contended CPU (CFS weight 36 against 1024), which `inferd serve` does not suffer.
# A local Ray that inferd starts runs them at 0; on a cluster, `ray start` with RAY_worker_niceness=0 does the same.
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0"}

# The routes whose body names a model, and the kind the body's `model` defaults to when it is left out.
_BODY_ROUTES = {
    "/v1/chat/completions": ModelKind.GENERATE,
    "/v1/completions": ModelKind.GENERATE,
    "/tokenize": ModelKind.GENERATE,
    "/detokenize": ModelKind.GENERATE,
    "/v1/embeddings": ModelKind.EMBED,
}


@dataclass
class ForwardedRequest:
    """One HTTP request as the ingress hands it to a model replica. `prompt` is what prefix-affinity routing matches
    on (PrefixCacheAffinityRouter reads an argument's `prompt` attribute)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str


def _prompt_text(body: Any, path: str) -> str:
    """Chat messages' text joined, or the completion prompt; the path when there is none (the router divides by
    the text's length, so it must not be empty)."""
    text = ""
    if isinstance(body, dict):
        messages = body.get("messages")
        prompt = body.get("prompt", body.get("input"))
        if isinstance(messages, list):
            parts = []
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):
                    parts += [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
            text = "".join(parts)
        elif isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            text = prompt[0]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            text = " ".join(str(p) for p in prompt)
    return text or path


# ---------------------------------------------------------------------------------------------- the replica


class StreamBudget:
    """A replica's budget of streamed messages to Ray per second, shared by its open streams: each stream's
    interval (CoalescingSend) is the larger of its floor (DeploymentOptions.stream_interval_ms) and open streams /
    messages_per_s. A fixed interval leaves the message rate growing with concurrency (16 streams at 50 ms: 320
    messages/s, each costing the replica and Serve's proxy CPU the engine then lacks: benchmarks/RESULTS.md); with
    the budget a lone stream keeps its floor and 16 streams at 80 messages/s get 200 ms each. One per replica, used
    from its event loop only."""

    def __init__(self, messages_per_s: float) -> None:
        self.messages_per_s = messages_per_s
        self.num_open_streams = 0

    def interval_s(self, floor_s: float) -> float:
        return max(floor_s, self.num_open_streams / self.messages_per_s)


class CoalescingSend:
    """An ASGI `send` for a replica's answers that holds a streamed body's chunks for up to `interval_s` and passes
    them on joined, as one message: each message costs Ray a generator item (the replica's pickling and report, the
    proxy's receive and write), and with many streams on a few cores those per-chunk costs, not the bytes, were
    Ray's overhead (benchmarks/RESULTS.md). Chunks are joined whole and in order (an SSE event is never split); a
    chunk that comes `interval_s` or more after the last message passed goes at once (the first token is never
    held), and a held chunk waits at most until `interval_s` after the last message. The response's start, its last
    body message (which carries the held chunks before its own body) and anything else pass at once. interval_s
    0: every message passes as it comes. `close()` (after the app returned or raised) passes what is still held.
    budget: the replica's StreamBudget, which then sets the interval (interval_s its floor); the response counts as
    an open stream from its first held-back chunk (a body with more to come) until close()."""

    def __init__(self, send: Any, interval_s: float, budget: StreamBudget | None = None) -> None:
        self._send = send
        self._interval_s = interval_s
        self._budget = budget
        self._is_counted = False  # this response is one of the budget's open streams
        self._held: list[bytes] = []
        self._last_sent_s = float("-inf")  # time.monotonic() of the last message passed on
        self._timer: asyncio.TimerHandle | None = None
        self._flush_tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        self._lock = asyncio.Lock()  # one message passed at a time: a timer's flush and the app's send keep order
        self._is_finished = False  # the last body message has passed: nothing more may follow it
        self._error: BaseException | None = None  # a timer flush's failure (a client gone), raised at the next send

    async def __call__(self, message: dict[str, Any]) -> None:
        if self._error is not None:
            raise self._error
        is_more_body = message["type"] == "http.response.body" and message.get("more_body", False)
        if is_more_body and self._budget is not None and not self._is_counted:
            self._is_counted = True
            self._budget.num_open_streams += 1
        interval_s = self._interval_s if self._budget is None else self._budget.interval_s(self._interval_s)
        if is_more_body and interval_s > 0:
            self._held.append(message.get("body", b""))
            wait_s = self._last_sent_s + interval_s - time.monotonic()
            if wait_s <= 0:
                await self._flush()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(wait_s, self._on_timer)
            return
        self._cancel_timer()
        async with self._lock:
            if self._held and message["type"] == "http.response.body":
                message = {**message, "body": b"".join([*self._held, message.get("body", b"")])}
                self._held = []
            elif self._held:
                await self._pass_held()
            if message["type"] == "http.response.body":
                self._is_finished = not message.get("more_body", False)
                self._last_sent_s = time.monotonic()  # (the start does not count: the first chunk goes at once)
            await self._send(message)

    async def close(self) -> None:
        """After the app returned or raised without its last body message: pass what is held. A send that fails
        here (the client gone) is dropped, so that the app's own exception, if any, is the one that propagates."""
        if self._is_counted:
            self._is_counted = False
            self._budget.num_open_streams -= 1
        self._cancel_timer()
        if self._held and not self._is_finished and self._error is None:
            try:
                await self._flush()
            except Exception:  # noqa: BLE001 - nobody is left to receive it
                logger.debug("could not pass a stream's last held chunks", exc_info=True)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._flush_from_timer())
        self._flush_tasks.add(task)
        task.add_done_callback(self._flush_tasks.discard)

    async def _flush_from_timer(self) -> None:
        try:
            await self._flush()
        except Exception as exc:  # noqa: BLE001 - the app's next send raises it, as the app's own send would have
            self._error = exc

    async def _flush(self) -> None:
        async with self._lock:
            if self._held and not self._is_finished:
                await self._pass_held()

    async def _pass_held(self) -> None:
        body, self._held = b"".join(self._held), []
        self._last_sent_s = time.monotonic()
        await self._send({"type": "http.response.body", "body": body, "more_body": True})


async def call_asgi(app: Any, request: ForwardedRequest, stream_interval_s: float = 0.0,
                    stream_budget: StreamBudget | None = None) -> AsyncIterator[dict[str, Any]]:
    """Run one request through an ASGI app in this process, yielding its response messages: first
    {"status", "headers"}, then {"body"} chunks (whatever the app sent since the last one, joined). Closing the
    iterator early is a client disconnect (a stream's request is aborted)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    disconnected = asyncio.Event()
    done = object()
    is_body_sent = False
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
        "query_string": request.query_string, "headers": request.headers, "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }

    async def receive() -> dict[str, Any]:
        nonlocal is_body_sent
        if not is_body_sent:
            is_body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    is_coalesced = stream_interval_s > 0 or stream_budget is not None
    coalesced = CoalescingSend(send, stream_interval_s, stream_budget) if is_coalesced else None

    async def run() -> None:
        try:
            try:
                await app(scope, receive, coalesced or send)
            finally:
                if coalesced is not None:  # what the app sent before it returned or raised comes first
                    await coalesced.close()
        except Exception as exc:  # noqa: BLE001 - reported to the ingress as a 500 below
            await queue.put(exc)
        finally:
            await queue.put(done)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await queue.get()
            if message is done:
                return
            if isinstance(message, Exception):
                raise message
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
                continue
            chunks = [message.get("body", b"")]
            while not queue.empty():  # one Ray item for every chunk the app has sent meanwhile
                extra = queue.get_nowait()
                if extra is done or isinstance(extra, Exception) or extra.get("type") != "http.response.body":
                    queue.put_nowait(extra)  # a single-consumer queue: put back at the end is in order here
                    break
                chunks.append(extra.get("body", b""))
            body = b"".join(chunks)
            if body:
                yield {"body": body}
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (TimeoutError, asyncio.TimeoutError):
                task.cancel()


def _process_age_s() -> float:
    """Seconds since this process started (Linux; NaN elsewhere)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime_s = float(open("/proc/uptime").read().split()[0])
        return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class ModelReplica:
    """One replica of one model: inferd's app with that model loaded, in this Ray actor."""

    async def __init__(self, spec: ModelSpec, options: ServerOptions, board: Any = None,
                       stream_interval_s: float = 0.0, stream_messages_per_s: float = 0.0) -> None:
        """stream_interval_s: how long a streamed answer's chunks may be held to go to Ray as one message
        (CoalescingSend; DeploymentOptions.stream_interval_ms), at least; stream_messages_per_s: the replica's budget
        of streamed messages per second (StreamBudget; 0: none, the interval alone)."""
        started, process_age_s = time.perf_counter(), _process_age_s()  # age: Ray's worker start and replica setup
        from inferd.server.app import build_app

        self.spec = spec
        self.stream_interval_s = stream_interval_s
        self.stream_budget = StreamBudget(stream_messages_per_s) if stream_messages_per_s > 0 else None
        self._app = build_app(options, [spec])
        built = time.perf_counter()
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()
        served = self._app.state.inferd.models[spec.name]
        await served.loaded_event.wait()
        if served.status != "ready":
            raise RuntimeError(f"model {spec.name!r} failed to load: {served.load_error}")
        timings = getattr(getattr(served.engine, "engine", None), "load_timings_s", {})
        # Where a scale from zero's seconds go (benchmarks/ray_serve.py reads Ray's share from the controller's log).
        logger.info("model %s: process age %.2f s at the constructor; inferd imports and app %.2f s; load %.2f s (%s)",
                    spec.name, process_age_s, built - started, time.perf_counter() - built,
                    ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        self._is_first_request = True
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context is not None else f"pid{os.getpid()}"
        self._board = board
        self._push_task = asyncio.create_task(self._push_metrics()) if board is not None else None

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
        started, is_first = time.perf_counter(), self._is_first_request
        self._is_first_request = False
        async for message in call_asgi(self._app, request, self.stream_interval_s, self.stream_budget):
            if "status" in message:  # which replica answered (prefix-affinity is visible to clients and tests)
                message["headers"].append((REPLICA_HEADER.encode(), self.replica_id.encode()))
            elif is_first:
                logger.info("first request's first body bytes after %.3f s", time.perf_counter() - started)
                is_first = False
            yield message

    async def metrics_text(self) -> str:
        body = b""
        async for message in call_asgi(self._app, ForwardedRequest("GET", "/metrics", b"", [], b"", "")):
            body += message.get("body", b"")
        return body.decode()

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self._board.put.remote(self.spec.name, self.replica_id, await self.metrics_text())
            except Exception:  # noqa: BLE001 - the board restarting must not end the replica
                logger.warning("could not push metrics to the board", exc_info=True)
            await asyncio.sleep(METRICS_PUSH_PERIOD_S)

    async def check_health(self) -> None:
        served = self._app.state.inferd.models[self.spec.name]
        if served.engine is None or not served.engine.is_running:
            raise RuntimeError(f"the engine of {self.spec.name!r} is not running")

    async def __del__(self) -> None:
        # Ray Serve calls this after the graceful drain (in-flight requests finished or timed out).
        if self._push_task is not None:
            self._push_task.cancel()
            try:
                await asyncio.wait_for(self._board.drop.remote(self.replica_id), BOARD_DROP_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a stale entry ages out of the board after METRICS_STALE_S anyway
                pass
        await self._lifespan.__aexit__(None, None, None)


class _ReplicaFront:
    """The ASGI app Serve's proxy calls when a model's replicas are the application's ingress (one hop: see
    build_application): the replica's inferd app, plus what the ingress adds in front of it otherwise: /metrics
    with every replica's series from the board, and the x-inferd-replica header."""

    def __init__(self, replica: "ModelReplica") -> None:
        self._replica = replica

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the inferd app's own lifespan ran in the replica's constructor
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        replica = self._replica
        path, root_path = scope.get("path", ""), scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path):]
        if scope["type"] == "http" and path == "/metrics" and replica._board is not None:
            texts = await replica._board.collect.remote()
            response = Response(merge_exposition(texts), media_type="text/plain; version=0.0.4; charset=utf-8")
            await response(scope, receive, send)
            return
        replica_header = (REPLICA_HEADER.encode(), replica.replica_id.encode())

        async def send_with_replica(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), replica_header]}
            await send(message)

        if (replica.stream_interval_s <= 0 and replica.stream_budget is None) or scope["type"] != "http":
            await replica._app(scope, receive, send_with_replica)
            return
        coalesced = CoalescingSend(send_with_replica, replica.stream_interval_s, replica.stream_budget)
        try:
            await replica._app(scope, receive, coalesced)
        finally:  # what the app sent before it returned or raised goes out first
            await coalesced.close()


@serve.ingress()
class ModelIngressReplica(ModelReplica):
    """A ModelReplica that Serve's proxy calls directly (HTTP in, the inferd app's answer out)."""

    def __serve_build_asgi_app__(self) -> Any:
        return _ReplicaFront(self)


class MetricsBoard:
    """The latest Prometheus text of every model replica, for the ingress's /metrics."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[str, str, float]] = {}  # replica id -> (model, text, time pushed)

    def put(self, model: str, replica_id: str, text: str) -> None:
        self._texts[replica_id] = (model, text, time.monotonic())

    def drop(self, replica_id: str) -> None:
        self._texts.pop(replica_id, None)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        for replica_id in [r for r, (_, _, t) in self._texts.items() if now - t > METRICS_STALE_S]:
            del self._texts[replica_id]
        return {replica_id: text for replica_id, (_, text, _) in sorted(self._texts.items())}


# ---------------------------------------------------------------------------------------------- the ingress

ingress_app = FastAPI(title="inferd on Ray Serve")


def _error(status_code: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code, headers=headers)


def _relayed_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw
            if k.lower() not in (b"content-length", b"transfer-encoding", b"connection")}


@serve.ingress(ingress_app)
class InferdIngress:
    def __init__(self, table: list[tuple[str, str]], handles: dict[str, Any], board: Any) -> None:
        """table: (model name, kind) in serving order; handles: model name -> its deployment handle."""
        self._kinds = {name: ModelKind(kind) for name, kind in table}
        self._handles = handles
        self._board = board
        self._started_at = int(time.time())

    def _names(self) -> str:
        return ", ".join(f"{n!r} ({k.value})" for n, k in self._kinds.items())

    @ingress_app.get("/health")
    async def health(self) -> JSONResponse:
        models = {name: {"kind": kind.value, "status": "ready"} for name, kind in self._kinds.items()}
        return JSONResponse({"status": "ok", "models": models})

    @ingress_app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._card(name) for name in self._kinds]})

    @ingress_app.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str) -> JSONResponse:
        if model_id not in self._kinds:
            return _error(404, f"model {model_id!r} does not exist; served models: {self._names()}", "model",
                          "model_not_found")
        return JSONResponse(self._card(model_id))

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._started_at, "owned_by": "inferd",
                "kind": self._kinds[name].value}

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        texts = await self._board.collect.remote()
        return Response(merge_exposition(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def forward(self, path: str, request: Request) -> Response:
        path = "/" + path
        body = await request.body()
        name, parsed, error = self._model_of(path, request.method, body)
        if error is not None:
            return error
        forwarded = ForwardedRequest(request.method, path, request.scope.get("query_string", b""),
                                     list(request.scope["headers"]), body, _prompt_text(parsed, path))
        return await self._relay(name, forwarded)

    def _model_of(self, path: str, method: str, body: bytes) -> tuple[str, Any, Response | None]:
        """(model name, parsed JSON body or None, None) or (.., .., the error response)."""
        parsed: Any = None
        if path.startswith("/v2/models/"):
            name = path[len("/v2/models/"):].split("/", 1)[0]
        elif path in _BODY_ROUTES and method == "POST":
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            name = parsed.get("model") if isinstance(parsed, dict) else None
            if name is None:
                of_kind = [n for n, k in self._kinds.items() if k is _BODY_ROUTES[path]]
                if len(of_kind) != 1:  # (a body that is not JSON goes to the only model, whose app says why)
                    return "", None, _error(400, f"model is required: this server serves {self._names()}", "model")
                name = of_kind[0]
        else:
            return "", None, _error(404, f"{path} is not served on Ray Serve (its routes: /v1/chat/completions, "
                                         f"/v1/completions, /v1/embeddings, /tokenize, /detokenize, /v2/models/...,"
                                         f" /v1/models, /health, /metrics)", code="not_found")
        if not isinstance(name, str) or name not in self._handles:
            return "", None, _error(404, f"model {name!r} does not exist; served models: {self._names()}", "model",
                                    "model_not_found")
        return name, parsed, None

    async def _relay(self, name: str, forwarded: ForwardedRequest) -> Response:
        handle = self._handles[name].options(stream=True)
        failure = "no replica answered"
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
            stream = handle.handle.remote(forwarded)
            try:
                start = await stream.__anext__()
            except _REPLICA_GONE as exc:
                failure = f"{type(exc).__name__}"
                continue
            except StopAsyncIteration:
                failure = "the replica ended the answer before it began"
                continue
            headers = _relayed_headers(start["headers"])
            if headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(self._relay_stream(name, stream), status_code=start["status"],
                                         headers=headers)
            chunks = []
            try:
                async for message in stream:
                    chunks.append(message["body"])
            except _REPLICA_GONE as exc:
                failure = f"{type(exc).__name__}"
                continue
            return Response(b"".join(chunks), status_code=start["status"], headers=headers)
        logger.warning("model %s: %d attempts failed (%s); answering 503", name, MAX_ATTEMPTS, failure)
        return _error(503, f"no replica of model {name!r} could answer ({failure}); retry", code="replica_unavailable",
                      headers={"Retry-After": "1"})

    async def _relay_stream(self, name: str, stream: Any) -> AsyncIterator[bytes]:
        try:
            async for message in stream:
                yield message["body"]
        except _REPLICA_GONE as exc:
            body = error_body(503, f"the replica of model {name!r} serving this stream went away "
                                   f"({type(exc).__name__}); retry the request", None, "replica_unavailable")
            yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
        finally:
            stream.cancel()


# ---------------------------------------------------------------------------------------------- building


def prefix_router_class() -> type:
    """Ray Serve LLM's PrefixCacheAffinityRouter. Its public module (ray.serve.llm) imports what `ray[llm]` installs
    (pyarrow, ...), which inferd does not need; the class itself lives in a module that imports only Ray Serve."""
    try:
        from ray.serve.llm.request_router import PrefixCacheAffinityRouter
    except ImportError:
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
            PrefixCacheAffinityRouter,
        )
    return PrefixCacheAffinityRouter


def is_one_hop(config: DeployConfig) -> bool:
    """Whether the model's replicas can be the application's ingress (proxy -> replica, one Ray hop per streamed
    message instead of two): one model, always at least one replica (else /health and /metrics scrapes, which the
    ingress answers without a replica, would start one or keep it from scaling to zero), and no prefix-affinity
    routing to do (one replica at most, or affinity off: the proxy routes by load only). What the ingress adds and a
    one-hop application does not: a request whose replica dies before answering is not retried on another (the
    proxy answers 500), and a stream cut by a replica's death ends without an SSE error event (the connection
    closes mid-body, which HTTP clients report as an error)."""
    if len(config.specs) != 1:
        return False
    options = config.deployments[config.specs[0].name]
    return options.min_replicas >= 1 and (options.max_replicas == 1 or not options.prefix_affinity)


def _model_deployment(spec: ModelSpec, options: DeploymentOptions, is_ingress: bool = False,
                      env_vars: Mapping[str, str] | None = None) -> Any:
    router = None
    if spec.kind is ModelKind.GENERATE and options.prefix_affinity and not is_ingress:
        router = RequestRouterConfig(request_router_class=prefix_router_class(),
                                     request_router_kwargs={"imbalanced_threshold": options.prefix_imbalance_threshold})
    extra = {"request_router_config": router} if router is not None else {}
    with warnings.catch_warnings():  # metrics_interval_s is deprecated in Ray 2.60, yet the only setting it reads
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*", category=DeprecationWarning)
        return _model_deployment_options(spec, options, extra, is_ingress, env_vars)


def _model_deployment_options(spec: ModelSpec, options: DeploymentOptions, extra: dict[str, Any],
                              is_ingress: bool, env_vars: Mapping[str, str] | None) -> Any:
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus}
    if env_vars:
        actor_options["runtime_env"] = {"env_vars": dict(env_vars)}
    if options.min_replicas == options.max_replicas and options.initial_replicas in (None, options.min_replicas):
        # A fixed count: no autoscaler, whose handles and replicas would report their load every metrics_interval_s.
        extra = {**extra, "num_replicas": options.min_replicas}
    else:
        extra = {**extra, "autoscaling_config": options.autoscaling_config()}
    return serve.deployment(ModelIngressReplica if is_ingress else ModelReplica).options(
        name=f"model-{spec.name}",
        max_ongoing_requests=options.max_ongoing_requests,
        graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5.0,
        ray_actor_options=actor_options,
        **extra,
    )


def build_application(config: DeployConfig, server_options: ServerOptions, one_hop: bool | None = None,
                      replica_env_vars: Mapping[str, str] | None = None) -> Any:
    """The Ray Serve application (not yet running) of a deploy config. one_hop: the model's replicas are the
    ingress (None: when is_one_hop(config); True where it is not possible is an error). replica_env_vars: the model
    replicas' environment (Ray Serve's RAY_SERVE_* switches are read there)."""
    board = serve.deployment(MetricsBoard).options(name="metrics-board", num_replicas=1,
                                                   ray_actor_options={"num_cpus": 0}).bind()
    if one_hop is None:
        one_hop = is_one_hop(config)
    if one_hop:
        if len(config.specs) != 1:
            raise ValueError("one hop (the model's replicas as the ingress) needs exactly one model")
        (spec,) = config.specs
        options = config.deployments[spec.name]
        return _model_deployment(spec, options, is_ingress=True, env_vars=replica_env_vars).bind(
            spec, server_options, board, options.stream_interval_ms / 1000, options.stream_messages_per_s)
    handles = {spec.name: _model_deployment(spec, config.deployments[spec.name], env_vars=replica_env_vars).bind(
        spec, server_options, board, config.deployments[spec.name].stream_interval_ms / 1000,
        config.deployments[spec.name].stream_messages_per_s) for spec in config.specs}
    table = [(spec.name, spec.kind.value) for spec in config.specs]
    return serve.deployment(InferdIngress).options(
        name="ingress", num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0},
    ).bind(table, handles, board)


def default_server_options() -> ServerOptions:
    """What `inferd serve` would run with, for builders given only a deploy config (prepared weights on)."""
    from inferd.store import inferd_home

    return ServerOptions(llm_defaults={"prepared_weights_dir": str(inferd_home() / "prepared")})


def build_app(args: Mapping[str, Any]) -> Any:
    """`serve run inferd.deploy.ray_serve:build_app config=deploy.yaml` (Ray Serve's application builder)."""
    if "config" not in args:
        raise ValueError("build_app needs config=PATH (a deploy config: see inferd/deploy/config.py)")
    return build_application(read_deploy_config(args["config"]), default_server_options())


def use_local_ray_env() -> None:
    """Before ray.init starts a local Ray: LOCAL_RAY_ENV, unless the environment says otherwise."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def run(config: DeployConfig, server_options: ServerOptions, *, blocking: bool = True) -> None:
    """Connect to $RAY_ADDRESS (or start a local Ray), start Serve's proxy on config.host:port, deploy, and (blocking)
    wait until interrupted; then the application is deleted (replicas drain)."""
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            use_local_ray_env()
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_application(config, server_options), name=APP_NAME, route_prefix="/", blocking=False)
    names = ", ".join(f"{s.name} ({config.deployments[s.name].min_replicas}-{config.deployments[s.name].max_replicas}"
                      f" replicas)" for s in config.specs)
    print(f"inferd on Ray Serve: http://{config.host}:{config.port} serving {names}", flush=True)
    if not blocking:
        return

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # SIGTERM drains like Ctrl-C: the replicas finish what they hold
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
