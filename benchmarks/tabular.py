"""Tabular scoring over OIP v2 JSON/HTTP: inferd against Triton, KServe, MLServer and FastAPI by hand, same run.

    python benchmarks/tabular.py                       # every system whose set-up works, c = 1, 16, 64
    python benchmarks/tabular.py --setup-peers         # first: one venv per peer under ~/.cache/inferd-bench/peers
    python benchmarks/tabular.py --systems inferd,fastapi --duration-s 5 --rounds 1

Workload (the issue's): the fraud model of examples/fraud (XGBoost, 200 trees, 12 FP32 features, trained here
on 100k seeded transactions), one row per request as OIP v2 JSON over HTTP/1.1 keep-alive, closed loop at each
concurrency for --duration-s seconds, rounds alternating between systems, medians of the rounds quoted.
The load generator is wrk (C, one thread; `apt-get install wrk`), which stays far below its own ceiling here.
Every system runs one server process with one onnxruntime thread and dynamic batching where it has it:

    inferd        inferd serve --model-repository: model.json converted to ONNX at load, batching max 256, no delay
    inferd-b1     the same model with dynamic batching off (every request runs alone): the batching gain
    inferd-asgi   inferd with infer answered through uvicorn's ASGI cycle (INFERD_HOT_ROUTES=0), not inside the
                  HTTP protocol (server/fast_http.py): what that path is worth
    triton        tritonserver from nvidia-pytriton, Python backend + onnxruntime, dynamic batching (max 64, 100 us)
    kserve        KServe Python ModelServer + onnxruntime (a kserve.Model subclass), no batching
    mlserver      MLServer XGBoost runtime on model.json, adaptive batching (max 64, 2 ms)
    fastapi       FastAPI + uvicorn + onnxruntime by hand, no batching

gRPC ModelInfer runs (inferd, Triton) are driven by h2load where installed (`apt-get install nghttp2-client`:
nghttp2's compiled HTTP/2 load generator, the gRPC counterpart of wrk), else by Python grpc.aio processes.

Also an approximately open-loop run of inferd at --open-loop-rps (wrk with 64 connections, exponential gaps
between each connection's requests: Poisson while responses are much faster than the gaps) and its p99.
Prints one table (scores/s and p50/p99 ms per system and concurrency) to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = Path.home() / ".cache" / "inferd-bench" / "peers"
WORK_DIR = Path.home() / ".cache" / "inferd-bench" / "tabular"
PEER_PACKAGES = {
    "kserve": ["kserve==0.21.*", "onnxruntime"],
    # MLServer 1.7.1 breaks on newer uvloop.
    "mlserver": ["mlserver==1.7.1", "mlserver-xgboost==1.7.1", "uvloop==0.21.0"],
    "pytriton": ["nvidia-pytriton", "onnxruntime"],
}
ALL_SYSTEMS = ("inferd", "inferd-b1", "inferd-asgi", "triton", "kserve", "mlserver", "fastapi")
# --grpc-echo: grpcio's own ceiling on this machine. A grpc.aio server on uvloop (as inferd's gRPC port runs) whose
# ModelInfer parses nothing, runs no model and returns inferd's own answer to the benchmark's request, bytes saved
# beforehand: what any Python server built on grpcio can reach at most under the same h2load.
GRPC_ECHO = r'''
import sys, grpc, uvloop
port, reply = int(sys.argv[1]), open(sys.argv[2], "rb").read()
async def model_infer(request, context):
    return reply
async def main():
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(model_infer, request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                          {"ModelInfer": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
uvloop.run(main())
'''
NUM_TREES = 200
NUM_BODIES = 256  # distinct rows the load generator cycles through

FASTAPI_PEER = r'''
import sys, numpy as np, onnxruntime as ort, uvicorn
from fastapi import FastAPI, Request
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
app = FastAPI()
@app.get("/v2/models/fraud/ready")
async def ready(): return {}
@app.post("/v2/models/fraud/infer")
async def infer(request: Request):
    body = await request.json()
    tensor = body["inputs"][0]
    rows = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    probabilities = session.run(["probabilities"], {"input": rows})[0]
    return {"model_name": "fraud", "id": body.get("id"), "outputs": [{"name": "probabilities", "datatype": "FP32",
            "shape": list(probabilities.shape), "data": probabilities.ravel().tolist()}]}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
'''

KSERVE_PEER = r'''
import sys, numpy as np, onnxruntime as ort, kserve
from kserve import InferOutput, InferResponse
class Fraud(kserve.Model):
    def __init__(self):
        super().__init__("fraud")
        options = ort.SessionOptions(); options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
        self.ready = True
    def predict(self, payload, headers=None):
        rows = payload.inputs[0].as_numpy()
        probabilities = self.session.run(["probabilities"], {"input": rows})[0]
        output = InferOutput(name="probabilities", shape=list(probabilities.shape), datatype="FP32")
        output.set_data_from_numpy(probabilities, binary_data=False)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[output])
kserve.ModelServer(http_port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), workers=1, enable_docs_url=False).start([Fraud()])
'''

TRITON_PEER = r'''
import sys, numpy as np, onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
@batch
def infer(input):
    return {"probabilities": session.run(["probabilities"], {"input": input})[0]}
config = TritonConfig(http_port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), metrics_port=int(sys.argv[4]))
with Triton(config=config) as triton:
    triton.bind(model_name="fraud", infer_func=infer,
                inputs=[Tensor(name="input", dtype=np.float32, shape=(12,))],
                outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(2,))],
                config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=100)))
    triton.serve()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- the model


def prepare_model(work_dir: Path) -> Path:
    """Train the fraud model once; returns the directory with repo/, model.onnx, model.json, rows.npy."""
    marker = work_dir / f"trees-{NUM_TREES}.done"
    if marker.exists():
        return work_dir
    shutil.rmtree(work_dir, ignore_errors=True)
    repo = work_dir / "repo"
    subprocess.run([sys.executable, str(REPO_ROOT / "examples/fraud/train.py"), "--repository", str(repo),
                    "--num-rows", "100000", "--num-trees", str(NUM_TREES), "--num-holdout-rows", str(NUM_BODIES)],
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    sys.path.insert(0, str(REPO_ROOT))
    from inferd.tabular.convert import convert_to_onnx

    model_json = repo / "fraud" / "1" / "model.json"
    (work_dir / "model.onnx").write_bytes(convert_to_onnx(model_json))
    mlserver_dir = work_dir / "mlserver" / "fraud"
    mlserver_dir.mkdir(parents=True)
    shutil.copy(model_json, mlserver_dir / "model.json")
    # inferd-b1: the same model with no dynamic_batching block (Triton's meaning: every request runs alone).
    nobatch = repo / "fraud_b1"
    (nobatch / "1").mkdir(parents=True)
    shutil.copy(model_json, nobatch / "1" / "model.json")
    config = (repo / "fraud" / "config.pbtxt").read_text()
    config = re.sub(r"\ndynamic_batching[^\n]*", "", config).replace('name: "fraud"', 'name: "fraud_b1"')
    (nobatch / "config.pbtxt").write_text(config)
    holdout = np.load(work_dir / "fraud-holdout.npz")
    np.save(work_dir / "rows.npy", holdout["features"])
    marker.write_text("ok")
    return work_dir


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    infer_path: str
    log_path: Path
    body_extra: dict
    grpc_port: int | None = None


def peer_python(name: str) -> Path:
    return PEERS_DIR / name / "bin" / "python"


def setup_peers() -> None:
    for name, packages in PEER_PACKAGES.items():
        if peer_python(name).exists() and (PEERS_DIR / name / ".installed").exists():
            continue
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_DIR / name)], check=True)
        proc = subprocess.run([str(peer_python(name)), "-m", "pip", "install", "-q", *packages])
        if proc.returncode == 0:
            (PEERS_DIR / name / ".installed").write_text("ok")
        print(f"peer {name}: {'installed' if proc.returncode == 0 else 'FAILED'}", flush=True)


def start_server(name: str, work_dir: Path, log_dir: Path) -> Server | None:
    port = free_port()
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    infer_path = "/v2/models/fraud/infer"
    body_extra: dict = {"outputs": [{"name": "probabilities"}]}
    grpc_port = None
    if name in ("inferd", "inferd-b1", "inferd-asgi"):
        env["PYTHONPATH"] = str(REPO_ROOT)
        grpc_port = free_port()
        cli = "import sys; from inferd.cli import main; sys.exit(main())"
        if name == "inferd-asgi":
            env["INFERD_HOT_ROUTES"] = "0"
        command = [sys.executable, "-c", cli, "serve",
                   "--model-repository", str(work_dir / "repo"), "--host", "127.0.0.1", "--port", str(port),
                   "--grpc-port", str(grpc_port)]  # fmt: skip
        if name == "inferd-b1":
            infer_path = "/v2/models/fraud_b1/infer"
    elif name == "fastapi":
        script = log_dir / "fastapi_peer.py"
        script.write_text(FASTAPI_PEER)
        command = [sys.executable, str(script), str(work_dir / "model.onnx"), str(port)]
    elif name == "kserve":
        script = log_dir / "kserve_peer.py"
        script.write_text(KSERVE_PEER)
        command = [str(peer_python("kserve")), str(script), str(work_dir / "model.onnx"), str(port), str(free_port())]
        body_extra = {}
    elif name == "triton":
        script = log_dir / "triton_peer.py"
        script.write_text(TRITON_PEER)
        grpc_port = free_port()
        venv = PEERS_DIR / "pytriton"
        env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"  # the Python backend's stub runs the venv's python
        libdir = Path(sys.base_prefix) / "lib"
        env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}"
        command = [str(peer_python("pytriton")), str(script), str(work_dir / "model.onnx"), str(port), str(grpc_port), str(free_port())]
    elif name == "mlserver":
        model_dir = work_dir / "mlserver"
        (model_dir / "settings.json").write_text(json.dumps(
            {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "debug": False}
        ))  # fmt: skip
        (model_dir / "fraud" / "model-settings.json").write_text(json.dumps({
            "name": "fraud", "implementation": "mlserver_xgboost.XGBoostModel",
            "max_batch_size": 64, "max_batch_time": 0.002, "parameters": {"uri": "./model.json"},
        }))  # fmt: skip
        command = [str(PEERS_DIR / "mlserver" / "bin" / "mlserver"), "start", str(model_dir)]
        body_extra = {}
    else:
        raise ValueError(name)
    if not Path(command[0]).exists():
        print(f"{name}: not set up ({command[0]} missing; run --setup-peers)", flush=True)
        return None
    log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, cwd=log_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, process, port, infer_path, log_path, body_extra, grpc_port)
    deadline = time.monotonic() + 300
    import urllib.request

    ready_path = infer_path.replace("/infer", "/ready")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"{name}: exited while starting, see {log_path}:\n{log_path.read_text()[-2000:]}", flush=True)
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    print(f"{name}: not ready after 300 s, see {log_path}", flush=True)
    stop_server(server)
    return None


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


# ---------------------------------------------------------------------------------------------- load


def lua_script(server: Server, rows: np.ndarray, path: Path, open_loop_mean_gap_ms: float | None) -> Path:
    bodies = []
    for i, row in enumerate(rows):
        body = {"id": f"r{i}", "inputs": [{"name": "input", "shape": [1, 12], "datatype": "FP32", "data": row.tolist()}]}
        body.update(server.body_extra)
        bodies.append(json.dumps(body))
    lines = ["local bodies = {"] + [f"  [[{b}]]," for b in bodies] + ["}", "local i = 0"]
    lines += [
        "request = function()",
        "  i = i + 1",
        f'  return wrk.format("POST", "{server.infer_path}", {{["Content-Type"] = "application/json"}}, bodies[(i % #bodies) + 1])',
        "end",
    ]
    if open_loop_mean_gap_ms is not None:
        lines += ["delay = function()", f"  return -math.log(1 - math.random()) * {open_loop_mean_gap_ms}", "end"]
    path.write_text("\n".join(lines) + "\n")
    return path


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert match, text
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


@dataclass
class LoadResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    num_errors: int


def run_wrk(server: Server, script: Path, concurrency: int, duration_s: int) -> LoadResult:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--latency", "--timeout", "10s", "-s", str(script),
               f"http://127.0.0.1:{server.port}"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    num_errors = int(errors.group(1)) if errors else 0
    if socket_errors:
        num_errors += sum(int(g) for g in socket_errors.groups())
    if "99" not in percentiles:  # no request finished within the run
        return LoadResult(rps, float("nan"), float("nan"), num_errors)
    return LoadResult(rps, _ms(percentiles["50"]), _ms(percentiles["99"]), num_errors)


def _grpc_client(task: tuple[str, list[bytes], int, float]) -> list[float]:
    """One client process: `concurrency` calls in flight for duration_s; latencies in ms."""
    import asyncio

    import grpc

    url, bodies, concurrency, duration_s = task

    async def run() -> list[float]:
        latencies: list[float] = []
        async with grpc.aio.insecure_channel(url) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # raw bytes both ways
            end = time.perf_counter() + duration_s

            async def worker(offset: int) -> None:
                i = offset
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    await call(bodies[i % len(bodies)])
                    latencies.append((time.perf_counter() - started) * 1e3)
                    i += 1

            await asyncio.gather(*(worker(k * 7) for k in range(concurrency)))
        return latencies

    return asyncio.run(run())


def grpc_bodies(rows: np.ndarray, model_name: str) -> list[bytes]:
    sys.path.insert(0, str(REPO_ROOT))
    from inferd.server.oip_grpc import inference_pb2 as pb

    bodies = []
    for row in rows:
        request = pb.ModelInferRequest(model_name=model_name)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 12])
        request.outputs.add(name="probabilities")
        request.raw_input_contents.append(np.ascontiguousarray(row[None, :], dtype="<f4").tobytes())
        bodies.append(request.SerializeToString())
    return bodies


def run_grpc_load(server: Server, bodies: list[bytes], concurrency: int, duration_s: int, num_processes: int) -> LoadResult:
    import multiprocessing

    per_process = [concurrency // num_processes + (1 if k < concurrency % num_processes else 0) for k in range(num_processes)]
    tasks = [(f"127.0.0.1:{server.grpc_port}", bodies, c, float(duration_s)) for c in per_process if c > 0]
    with multiprocessing.get_context("spawn").Pool(len(tasks)) as pool:
        parts = pool.map(_grpc_client, tasks)
    latencies = np.concatenate([np.asarray(p) for p in parts])
    return LoadResult(len(latencies) / duration_s, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), 0)


def run_h2load_grpc(server: Server, body: bytes, concurrency: int, duration_s: int, work_dir: Path) -> LoadResult:
    """gRPC ModelInfer from h2load (nghttp2's HTTP/2 load generator, C++: `apt-get install nghttp2-client`), the
    compiled client that wrk is for REST: `concurrency` connections with one call in flight each, the same
    pre-serialized request framed as gRPC (flag byte, 4-byte big-endian length, message). Latencies from its
    per-request log. h2load sees HTTP statuses only (gRPC errors travel in trailers), so the caller checks one
    call's answer through a real gRPC client first."""
    body_path = work_dir / "grpc-body.bin"
    body_path.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)
    log_path = work_dir / f"h2load-{concurrency}.log"
    command = ["h2load", "-t1", f"-c{concurrency}", "-m1", f"-D{duration_s}", "-d", str(body_path),
               "-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log_path}",
               f"http://127.0.0.1:{server.grpc_port}/inference.GRPCInferenceService/ModelInfer"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    statuses, latencies_us = [], []
    for line in log_path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            statuses.append(int(fields[1]))
            latencies_us.append(int(fields[2]))
    num_errors = sum(1 for status in statuses if status != 200)
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    rps = float(match.group(3)) if match else len(statuses) / duration_s
    latencies_ms = np.asarray(latencies_us, dtype=np.float64) / 1e3
    if latencies_ms.size == 0:
        return LoadResult(rps, float("nan"), float("nan"), num_errors)
    return LoadResult(rps, float(np.percentile(latencies_ms, 50)), float(np.percentile(latencies_ms, 99)), num_errors)


def check_grpc_answer(server: Server, body: bytes) -> bytes:
    """One ModelInfer by a real gRPC client: the server answers with an output (so h2load measures answers)."""
    import grpc

    sys.path.insert(0, str(REPO_ROOT))
    from inferd.server.oip_grpc import inference_pb2 as pb

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        answer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(body, timeout=10)
    response = pb.ModelInferResponse.FromString(answer)
    assert response.outputs and response.raw_output_contents, response
    return answer


def start_grpc_echo(reply: bytes, log_dir: Path) -> Server:
    """GRPC_ECHO on a free port, answering `reply` to every ModelInfer."""
    import grpc

    script, reply_path = log_dir / "grpc_echo.py", log_dir / "grpc_echo_reply.bin"
    script.write_text(GRPC_ECHO)
    reply_path.write_bytes(reply)
    port = free_port()
    log_path = log_dir / "grpcio-echo.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(script), str(port), str(reply_path)], stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return Server("grpcio-echo", process, 0, "", log_path, {}, grpc_port=port)


def check_answer(server: Server, row: np.ndarray) -> None:
    """One request by hand: the system answers 200 with a score (so the load is not measuring errors)."""
    import urllib.request

    body = {"id": "check", "inputs": [{"name": "input", "shape": [1, 12], "datatype": "FP32", "data": row.tolist()}]}
    body.update(server.body_extra)
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{server.infer_path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["outputs"], answer


def finite_median(values) -> float:
    """The median of the runs that finished requests (a starved run has no latency: NaN)."""
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def cpu_flags() -> str:
    try:
        flags = re.search(r"^flags\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split()
    except (OSError, AttributeError):
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration-s", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--open-loop-rps", type=float, default=2000.0, help="0 to skip the open-loop run")
    parser.add_argument("--setup-peers", action="store_true", help="create the peers' venvs first")
    parser.add_argument("--grpc-concurrency", default="1,16,64", help="gRPC runs (inferd, triton); empty to skip")
    parser.add_argument("--grpc-echo", action="store_true",
                        help="also load a grpc.aio server that answers inferd's saved reply without a model (GRPC_ECHO): "
                             "grpcio's own ceiling under the same h2load")
    parser.add_argument("--grpc-processes", type=int, default=2, help="Python gRPC client processes")
    parser.add_argument("--grpc-client", choices=("h2load", "python"), default=None,
                        help="gRPC load generator: h2load (compiled, like wrk for REST; the default where installed) "
                             "or Python grpc.aio processes")
    args = parser.parse_args(argv)
    if args.grpc_client is None:
        args.grpc_client = "h2load" if shutil.which("h2load") else "python"
    if shutil.which("wrk") is None:
        print("wrk is needed as the load generator: apt-get install wrk", file=sys.stderr)
        return 2
    if args.setup_peers:
        setup_peers()
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(ALL_SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; known: {list(ALL_SYSTEMS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    work_dir = prepare_model(WORK_DIR)
    rows = np.load(work_dir / "rows.npy")[:NUM_BODIES]
    log_dir = Path(tempfile.mkdtemp(prefix="inferd-tabular-bench-"))
    print(f"cpu: {os.cpu_count()} cores, flags {cpu_flags()}; logs in {log_dir}", flush=True)

    servers: dict[str, Server] = {}
    extra_servers: dict[str, Server] = {}  # gRPC-only references (--grpc-echo)
    try:
        for name in systems:
            if name == "inferd-b1" and "inferd" in servers:
                server = servers["inferd"]
                servers[name] = Server(name, server.process, server.port, "/v2/models/fraud_b1/infer", server.log_path, server.body_extra)
                continue
            server = start_server(name, work_dir, log_dir)
            if server is not None:
                try:
                    check_answer(server, rows[0])
                except Exception as exc:  # noqa: BLE001 - a peer that cannot answer is left out, with the reason
                    print(f"{name}: does not answer an infer request ({exc}); left out, see {server.log_path}", flush=True)
                    stop_server(server)
                    continue
                servers[name] = server
        scripts = {name: lua_script(s, rows, log_dir / f"{name}.lua", None) for name, s in servers.items()}
        results: dict[tuple[str, int], list[LoadResult]] = {}
        for name, server in servers.items():  # warm-up
            run_wrk(server, scripts[name], 16, 3)
        for round_index in range(args.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for name in order:
                for concurrency in concurrencies:
                    result = run_wrk(servers[name], scripts[name], concurrency, args.duration_s)
                    results.setdefault((name, concurrency), []).append(result)
                    print(f"round {round_index + 1} {name:10s} c={concurrency:3d}: {result.requests_per_s:8.0f}/s "
                          f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.num_errors}", flush=True)  # fmt: skip
        grpc_results: dict[tuple[str, int], list[LoadResult]] = {}
        grpc_concurrencies = [int(c) for c in args.grpc_concurrency.split(",") if c]
        grpc_servers = {n: s for n, s in servers.items() if s.grpc_port is not None and n != "inferd-b1"}
        grpc_failed: dict[str, str] = {}  # system -> why its gRPC load stopped (e.g. a peer's backend crashed)
        if grpc_concurrencies and grpc_servers:
            bodies = {n: grpc_bodies(rows, "fraud") for n in grpc_servers}
            for name in list(grpc_servers):
                try:
                    answer = check_grpc_answer(grpc_servers[name], bodies[name][0])
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    grpc_failed[name] = f"no gRPC answer: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    continue
                if args.grpc_echo and name == "inferd":
                    grpc_servers["grpcio-echo"] = extra_servers["grpcio-echo"] = start_grpc_echo(answer, log_dir)
                    bodies["grpcio-echo"] = bodies[name]
            for round_index in range(args.rounds):
                order = list(grpc_servers) if round_index % 2 == 0 else list(reversed(grpc_servers))
                for name in order:
                    if name in grpc_failed:
                        continue
                    for concurrency in grpc_concurrencies:
                        try:
                            if args.grpc_client == "h2load":
                                result = run_h2load_grpc(grpc_servers[name], bodies[name][0], concurrency,
                                                         args.duration_s, log_dir)  # fmt: skip
                            else:
                                result = run_grpc_load(grpc_servers[name], bodies[name], concurrency, args.duration_s,
                                                       args.grpc_processes)  # fmt: skip
                        except Exception as exc:  # noqa: BLE001 - a peer that breaks under load is reported, not fatal
                            grpc_failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                            print(f"round {round_index + 1} {name:10s} gRPC c={concurrency:3d}: FAILED {grpc_failed[name]}",
                                  flush=True)  # fmt: skip
                            break
                        grpc_results.setdefault((name, concurrency), []).append(result)
                        print(f"round {round_index + 1} {name:10s} gRPC c={concurrency:3d}: {result.requests_per_s:8.0f}/s "
                              f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.num_errors}",
                              flush=True)  # fmt: skip
        open_loop: list[LoadResult] = []
        if args.open_loop_rps > 0 and "inferd" in servers:
            num_connections = 64
            gap_ms = num_connections / args.open_loop_rps * 1e3
            script = lua_script(servers["inferd"], rows, log_dir / "open.lua", gap_ms)
            for _ in range(args.rounds):
                open_loop.append(run_wrk(servers["inferd"], script, num_connections, args.duration_s))
                print(f"open loop ~{args.open_loop_rps:.0f}/s: {open_loop[-1].requests_per_s:.0f}/s "
                      f"p50 {open_loop[-1].p50_ms:.2f} ms p99 {open_loop[-1].p99_ms:.2f} ms", flush=True)  # fmt: skip
    finally:
        for name, server in {**servers, **extra_servers}.items():
            if name != "inferd-b1":
                stop_server(server)

    print()
    print(f"scores/s (p50 ms / p99 ms), median of {args.rounds} rounds of {args.duration_s:g} s, wrk -t1, one row per request")
    print("| system | " + " | ".join(f"c={c}" for c in concurrencies) + " |")
    print("|---|" + "---|" * len(concurrencies))
    for name in servers:
        cells = []
        for concurrency in concurrencies:
            runs = results[(name, concurrency)]
            errors = sum(r.num_errors for r in runs)
            cell = (f"{statistics.median(r.requests_per_s for r in runs):.0f} "
                    f"({finite_median(r.p50_ms for r in runs):.2f} / {finite_median(r.p99_ms for r in runs):.2f})")  # fmt: skip
            cells.append(cell + (f" {errors} errors" if errors else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if grpc_results:
        print()
        print(f"gRPC ModelInfer, scores/s (p50 ms / p99 ms), median of {args.rounds} rounds, "
              + ("h2load -t1, one call in flight per connection, the same pre-serialized request"
                 if args.grpc_client == "h2load" else
                 f"{args.grpc_processes} Python grpc.aio client processes sending pre-serialized requests"))  # fmt: skip
        print("| system | " + " | ".join(f"c={c}" for c in grpc_concurrencies) + " |")
        print("|---|" + "---|" * len(grpc_concurrencies))
        for name in grpc_servers:
            cells = []
            for concurrency in grpc_concurrencies:
                runs = grpc_results.get((name, concurrency), [])
                if not runs:
                    cells.append(f"failed ({grpc_failed.get(name, 'no run')})")
                    continue
                cells.append(f"{statistics.median(r.requests_per_s for r in runs):.0f} "
                             f"({finite_median(r.p50_ms for r in runs):.2f} / {finite_median(r.p99_ms for r in runs):.2f})")  # fmt: skip
            print(f"| {name} | " + " | ".join(cells) + " |")
    if open_loop:
        print(f"| inferd open loop ~{args.open_loop_rps:.0f}/s | achieved {statistics.median(r.requests_per_s for r in open_loop):.0f}/s, "
              f"p50 {finite_median(r.p50_ms for r in open_loop):.2f} ms, p99 {finite_median(r.p99_ms for r in open_loop):.2f} ms |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
