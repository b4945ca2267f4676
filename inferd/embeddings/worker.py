"""Layer 4: an embedding model computing in a worker process of its own, so its batches never hold the server's
GIL (the LLM's step loop and the event loop live there).

    worker = EmbedWorkerProcess(path, num_channels=2, nice=5)
    worker.launch()                      # spawns a python running main() below: it loads the model
    worker.start()                       # blocks until the child is ready on every channel (launches if needed)
    vectors = worker.run([[101, 7592, 102], [101, 2088, 102]])   # float32 [2, dim], from any thread
    worker.close()

Why a process: a served embedding model used to compute on worker threads of the server process. torch releases
the GIL inside each kernel, but every op between two kernels needs it back, and so does each step of the LLM's
decode loop and of the event loop: an LLM stream beside embedding traffic lost more speed than the embeddings
took CPU (benchmarks/RESULTS.md, issue 16), and a low-priority embedding thread made it worse (descheduled while
holding the GIL, it stalled the step loop for seconds). In a child process the embedding compute has its own GIL
and its own OS priority (`nice`, set once at its start: an unprivileged process cannot raise it back).

The wire: one socketpair per channel (a server worker thread uses one channel at a time; the child serves each
channel on a thread of its own, one torch thread each). Messages are framed by multiprocessing's Connection:
  request  int32 [1 + n + sum(lengths)]: n, the n lengths, then every input's token ids in order
  reply    b"V" + float32 [n, dim] bytes (C order) | b"E" + an error message (UTF-8)
  ready    b"R" + the JSON {"dimension": dim, "pid": pid}, once per channel after the model loaded
If the child dies, every batch in flight on it fails with EmbedWorkerDiedError (a BatchAbortedError: the batcher
fails the batch at once, no one-by-one retry) and a new child is started at once on a background thread; the
next batch waits for it. The child exits when all its channels close (the server closed them or died).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from inferd.batching import BatchAbortedError

logger = logging.getLogger("inferd.embeddings.worker")

_READY, _VECTORS, _ERROR = b"R", b"V", b"E"


class EmbedWorkerDiedError(BatchAbortedError):
    """The embedding worker process died while running a batch (or could not be started again)."""


def encode_request(token_id_lists: Sequence[Sequence[int]]) -> bytes:
    """int32 [1 + n + sum(lengths)]: n, the lengths, the ids."""
    lengths = [len(ids) for ids in token_id_lists]
    flat = np.empty(1 + len(lengths) + sum(lengths), dtype=np.int32)
    flat[0] = len(lengths)
    flat[1 : 1 + len(lengths)] = lengths
    position = 1 + len(lengths)
    for ids in token_id_lists:
        flat[position : position + len(ids)] = ids
        position += len(ids)
    return flat.tobytes()


def decode_request(payload: bytes) -> list[list[int]]:
    flat = np.frombuffer(payload, dtype=np.int32)
    num = int(flat[0])
    lengths = flat[1 : 1 + num].tolist()
    ids = flat[1 + num :].tolist()
    out, position = [], 0
    for length in lengths:
        out.append(ids[position : position + length])
        position += length
    return out


class _Child:
    """One started child process and the server's ends of its channels."""

    def __init__(self, process: subprocess.Popen, conns: list[Connection], dimension: int) -> None:
        self.process = process
        self.free_conns = list(conns)  # channels no server thread uses now
        self.all_conns = conns
        self.dimension = dimension
        self.is_dead = False

    def close(self, timeout_s: float) -> None:
        for conn in self.all_conns:  # EOF on every channel: the child's threads end and it exits
            try:
                conn.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class EmbedWorkerProcess:
    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        num_channels: int,
        dtype: str = "auto",
        quantization: str = "none",
        nice: int = 0,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.num_channels = max(1, num_channels)
        self.dtype = dtype
        self.quantization = quantization
        self.nice = nice  # added to the child's niceness (0: the server's own priority)
        self.start_timeout_s = start_timeout_s
        self.num_restarts = 0  # children started after the first died
        self._lock = threading.Lock()  # guards _child and its free channels
        self._start_lock = threading.Lock()  # one start at a time
        self._child: _Child | None = None
        self._launched: tuple[subprocess.Popen, list[Connection]] | None = None  # spawned, not yet waited for
        self._is_closed = False

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.process.pid if child is not None else None

    def launch(self) -> None:
        """Spawn the child without waiting for it (its model loads meanwhile); start() waits for it."""
        with self._start_lock:
            if self._launched is None and self._child is None and not self._is_closed:
                self._launched = self._spawn()

    def start(self) -> None:
        """Start the child unless a live one runs; blocks until it is ready. RuntimeError if it cannot load."""
        with self._start_lock:
            if self._is_closed:
                raise EmbedWorkerDiedError("the embedding worker is closed")
            child = self._child
            if child is not None and not child.is_dead and child.process.poll() is None:
                return
            if child is not None:
                child.close(timeout_s=1.0)
                self.num_restarts += 1
            launched, self._launched = self._launched, None
            new_child = self._wait_ready(*(launched or self._spawn()))
            with self._lock:
                self._child = new_child

    def _spawn(self) -> tuple[subprocess.Popen, list[Connection]]:
        pairs = [socket.socketpair() for _ in range(self.num_channels)]
        child_fds = [child_end.fileno() for _, child_end in pairs]
        package_root = str(Path(__file__).resolve().parents[2])  # the directory holding the inferd package
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one torch thread per channel thread
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-c", "import sys; from inferd.embeddings.worker import main; sys.exit(main())",
               "--model", self.model_path, "--dtype", self.dtype, "--quantization", self.quantization,
               "--nice", str(self.nice), "--fds", ",".join(map(str, child_fds))]
        try:
            process = subprocess.Popen(cmd, pass_fds=child_fds, env=env, stdin=subprocess.DEVNULL)
        finally:
            for _, child_end in pairs:
                child_end.close()  # the child holds its own copies: its death is EOF on ours
        return process, [Connection(parent_end.detach()) for parent_end, _ in pairs]

    def _wait_ready(self, process: subprocess.Popen, conns: list[Connection]) -> _Child:
        deadline = time.monotonic() + self.start_timeout_s
        dimension = 0
        try:
            for conn in conns:
                while not conn.poll(0.2):
                    if process.poll() is not None:
                        raise RuntimeError(f"the embedding worker exited with code {process.returncode} while loading")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the embedding worker was not ready in {self.start_timeout_s:.0f} s")
                message = conn.recv_bytes()
                if message[:1] == _ERROR:
                    raise RuntimeError(f"the embedding worker could not load the model: {message[1:].decode()}")
                dimension = json.loads(message[1:])["dimension"]
        except BaseException:
            _Child(process, conns, dimension).close(timeout_s=1.0)
            raise
        logger.info("embedding worker pid %d ready (%d channels, nice +%d)", process.pid, len(conns), self.nice)
        return _Child(process, conns, dimension)

    def run(self, token_id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n, dim] for n token-id lists (checked by the caller). EmbedWorkerDiedError if the child dies
        meanwhile (a new one is starting when it is raised) or cannot be started."""
        try:
            self.start()  # a no-op while the child lives
        except RuntimeError as exc:
            raise EmbedWorkerDiedError(str(exc)) from None
        with self._lock:
            child = self._child
            assert child is not None and child.free_conns, "more batches at once than channels"
            conn = child.free_conns.pop()
        try:
            conn.send_bytes(encode_request(token_id_lists))
            reply = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            self._on_death(child, exc)
            raise EmbedWorkerDiedError(
                f"the embedding worker (pid {child.process.pid}) died while computing this batch; it is restarting"
            ) from None
        with self._lock:
            child.free_conns.append(conn)
        if reply[:1] == _ERROR:
            raise RuntimeError(f"embedding worker: {reply[1:].decode()}")
        return np.frombuffer(reply, dtype=np.float32, offset=1).reshape(len(token_id_lists), child.dimension)

    def _on_death(self, child: _Child, exc: BaseException) -> None:
        with self._lock:
            if child.is_dead:
                return
            child.is_dead = True
        code = child.process.poll()
        logger.error("embedding worker pid %d died (%s; exit code %s); starting a new one", child.process.pid,
                     type(exc).__name__, code)

        def restart() -> None:
            try:
                self.start()
            except Exception:  # noqa: BLE001 - the next batch tries again and reports it
                logger.exception("embedding worker: restart failed")

        threading.Thread(target=restart, name="inferd-embed-restart", daemon=True).start()

    def close(self, timeout_s: float = 10.0) -> None:
        with self._start_lock:
            self._is_closed = True
            child, self._child = self._child, None
            launched, self._launched = self._launched, None
        if launched is not None:
            _Child(launched[0], launched[1], 0).close(timeout_s)
        if child is not None:
            child.close(timeout_s)


# ------------------------------------------------------------------------------------------------ the child side


def _serve_channel(model, conn: Connection) -> None:
    import torch

    torch.set_num_threads(1)  # per thread: this channel's kernels run on its own thread, no OpenMP team
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server closed the channel (or died)
        try:
            vectors = model.embed_token_ids(decode_request(payload))
            reply = _VECTORS + np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
        except Exception as exc:  # noqa: BLE001 - reported to the batch, the channel lives on
            reply = _ERROR + f"{type(exc).__name__}: {exc}".encode()
        try:
            conn.send_bytes(reply)
        except OSError:
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferd.embeddings.worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--fds", required=True, help="comma-separated inherited socket fds, one per channel")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # before any thread starts: new threads inherit the calling thread's niceness
    conns = [Connection(int(fd)) for fd in args.fds.split(",")]
    try:
        import torch

        torch.set_num_threads(1)
        from inferd.embeddings.model import EmbeddingModel

        model = EmbeddingModel.from_path(args.model, device="cpu", dtype=args.dtype, quantization=args.quantization)
    except Exception as exc:  # noqa: BLE001 - told to the server, which raises it
        for conn in conns:
            try:
                conn.send_bytes(_ERROR + f"{type(exc).__name__}: {exc}".encode())
            except OSError:
                pass
        return 1
    ready = _READY + json.dumps({"dimension": model.dimension, "pid": os.getpid()}).encode()
    threads = []
    for index, conn in enumerate(conns):
        conn.send_bytes(ready)
        thread = threading.Thread(target=_serve_channel, args=(model, conn), name=f"embed-worker-{index}", daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
