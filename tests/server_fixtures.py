"""A real `inferd serve` subprocess for HTTP tests (import the fixtures into tests/conftest.py).

    inferd_server   session-scoped: the default model on 127.0.0.1 and a free port; yields
                    (base_url, model_name, process). `process.log_path` is the file its stdout+stderr go to.

`start_inferd_server(extra_args)` / `stop_inferd_server(process)` start further servers (another API key,
queue limit, ...). Every server loads the model, so tests share them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m-instruct"
# Small and fast: a 2048-token context and a 256 MiB KV cache keep a server's memory to a few hundred MiB. The
# response cache is off, so a repeated request reaches the engine (tests of the cache pass their own
# --response-cache-bytes, which comes later on the command line and wins).
SMALL_SERVER_ARGS = ("--max-model-len", "2048", "--kv-cache-memory", "256MiB", "--response-cache-bytes", "0")
# First start may pull the model into the store; later starts load it from disk.
STARTUP_TIMEOUT_S = 900.0
_CLI = "import sys; from inferd.cli import main; sys.exit(main())"


class InferdServer(NamedTuple):
    base_url: str  # http://127.0.0.1:PORT
    model_name: str
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(process: subprocess.Popen, num_chars: int = 6000) -> str:
    log_path = getattr(process, "log_path", None)
    if log_path is None or not Path(log_path).exists():
        return "(no log)"
    return Path(log_path).read_text(errors="replace")[-num_chars:]


def start_inferd_server(
    extra_args: Sequence[str] = (),
    *,
    model: str | Sequence[str] = DEFAULT_MODEL,
    env: dict[str, str] | None = None,
    health_headers: dict[str, str] | None = None,
) -> InferdServer:
    """Start `inferd serve` with one model or several (each `[NAME=]SOURCE`) and wait until /health answers 200;
    `model_name` of the result is the first model's served name."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="inferd-serve-", suffix=".log", delete=False)
    process_env = {**os.environ, **(env or {})}
    process_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), process_env.get("PYTHONPATH")]))
    process_env.setdefault("PYTHONUNBUFFERED", "1")
    models = [model] if isinstance(model, str) else list(model)
    model_flags = [flag for m in models for flag in ("--model", m)]
    command = [sys.executable, "-c", _CLI, "serve", *model_flags, "--host", "127.0.0.1", "--port", str(port),
               *SMALL_SERVER_ARGS, *extra_args]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=process_env, stdout=log_file, stderr=subprocess.STDOUT)
    process.log_path = log_file.name  # type: ignore[attr-defined]
    log_file.close()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"inferd serve exited with {process.returncode} while starting:\n{log_tail(process)}")
            try:
                if client.get("/health", headers=health_headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                stop_inferd_server(process)
                raise RuntimeError(f"inferd serve was not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{log_tail(process)}")
            time.sleep(0.25)
    served_name = next((extra_args[i + 1] for i, a in enumerate(extra_args[:-1]) if a == "--served-model-name"),
                       models[0].partition("=")[0] if "=" in models[0] else models[0])
    return InferdServer(base_url, served_name, process)


def stop_inferd_server(process: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM (the server drains), then SIGKILL if it does not exit in time; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def inferd_server(inferd_home: Path) -> Iterator[InferdServer]:
    """`inferd_home` (tests/conftest.py) exports $INFERD_HOME, so the server finds the test model store."""
    server = start_inferd_server()
    try:
        yield server
    finally:
        stop_inferd_server(server.process)
