"""OIP v2 (KServe v2 / Triton) against a real `inferd serve --model-repository DIR --grpc-port P` subprocess,
with the official clients (`tritonclient.http`, `tritonclient.grpc`) and raw httpx for malformed requests.

Scores are compared with the native XGBoost model's predict_proba (atol 1e-5; see tests/test_tabular.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pytest

from tests.server_fixtures import REPO_ROOT, free_port, log_tail, stop_inferd_server
from tests.tabular_fixtures import Reference, build_repository, mixed_type_inputs, train

import tritonclient.grpc as tritongrpc  # the official OIP clients (test extra)
import tritonclient.http as tritonhttp
from tritonclient.utils import InferenceServerException  # noqa: E402

SCORE_ATOL = 1e-5
_CLI = "import sys; from inferd.cli import main; sys.exit(main())"
SLOW_BATCH_CONFIG = """
name: "slow_batch"
max_batch_size: 64
dynamic_batching { max_queue_delay_microseconds: 400000 }
"""


class OIPServer(NamedTuple):
    http_url: str  # 127.0.0.1:PORT (tritonclient's form)
    grpc_url: str
    process: subprocess.Popen
    repo: Path


def start_oip_server(repo: Path, extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                     ) -> OIPServer:
    port, grpc_port = free_port(), free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="inferd-oip-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    command = [sys.executable, "-c", _CLI, "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
               "--port", str(port), "--grpc-port", str(grpc_port), *extra_args]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    process.log_path = log_file.name  # type: ignore[attr-defined]
    log_file.close()
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"inferd serve exited with {process.returncode}:\n{log_tail(process)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_inferd_server(process)
            raise RuntimeError(f"inferd serve was not ready after 300 s:\n{log_tail(process)}")
        time.sleep(0.25)
    return OIPServer(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", process, repo)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return train()


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference) -> Iterator[OIPServer]:
    repo = build_repository(tmp_path_factory.mktemp("oip"), reference)
    (repo / "slow_batch" / "1").mkdir(parents=True)
    (repo / "slow_batch" / "1" / "model.json").write_bytes((repo / "xgb_fraud" / "1" / "model.json").read_bytes())
    (repo / "slow_batch" / "config.pbtxt").write_text(SLOW_BATCH_CONFIG)
    served = start_oip_server(repo)
    try:
        yield served
    finally:
        stop_inferd_server(served.process)


@pytest.fixture
def http(server) -> Iterator[tritonhttp.InferenceServerClient]:
    client = tritonhttp.InferenceServerClient(server.http_url, concurrency=8)
    yield client
    client.close()


@pytest.fixture
def grpc(server) -> Iterator[tritongrpc.InferenceServerClient]:
    client = tritongrpc.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def _inputs(module, arrays: dict[str, np.ndarray], *, binary: bool = True) -> list:
    tensors = []
    for name, array in arrays.items():
        datatype = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}[str(array.dtype)]
        tensor = module.InferInput(name, list(array.shape), datatype)
        if module is tritonhttp:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


# ---------------------------------------------------------------------------------------------- metadata


def test_server_health_and_metadata(http, grpc):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    metadata = http.get_server_metadata()
    assert metadata["name"] == "inferd" and "model_repository" in metadata["extensions"]
    assert grpc.get_server_metadata().name == "inferd"


def test_model_metadata_readiness_and_versions(http, grpc):
    metadata = http.get_model_metadata("xgb_fraud")
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 12]}]
    assert metadata["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1, 1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]
    assert http.get_model_metadata("xgb_ubj", model_version="3")["versions"] == ["3"]
    grpc_metadata = grpc.get_model_metadata("mixed_types")
    assert [(t.name, t.datatype, list(t.shape)) for t in grpc_metadata.inputs] == [
        ("numeric", "FP32", [-1, 10]), ("merchant_category", "INT64", [-1, 1]), ("card_present", "BOOL", [-1, 1])
    ]  # fmt: skip
    assert http.is_model_ready("xgb_fraud") and http.is_model_ready("xgb_fraud", "1")
    assert grpc.is_model_ready("xgb_ubj", "3")
    assert not http.is_model_ready("xgb_fraud", "2") and not http.is_model_ready("nope")
    config = http.get_model_config("xgb_fraud")
    assert config["max_batch_size"] == 20000 and config["input"][0]["data_type"] == "TYPE_FP32"
    with pytest.raises(InferenceServerException, match="no version '2'"):
        http.get_model_metadata("xgb_fraud", model_version="2")
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        grpc.get_model_metadata("nope")


# ---------------------------------------------------------------------------------------------- infer


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_http_scores_match_predict_proba_on_10k_rows(http, reference, binary):
    rows = reference.features
    outputs = [tritonhttp.InferRequestedOutput("probabilities", binary_data=binary), tritonhttp.InferRequestedOutput("label", binary_data=binary)]
    result = http.infer("xgb_fraud", _inputs(tritonhttp, {"input": rows}, binary=binary), outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference.xgb.predict_proba(rows), rtol=0, atol=SCORE_ATOL)
    np.testing.assert_array_equal(result.as_numpy("label")[:, 0], reference.xgb.predict(rows))
    assert result.get_response()["model_version"] == "1"


def test_grpc_scores_match_predict_proba_on_10k_rows(grpc, reference):
    rows = reference.features
    result = grpc.infer("xgb_fraud", _inputs(tritongrpc, {"input": rows}))
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference.xgb.predict_proba(rows), rtol=0, atol=SCORE_ATOL)


def test_every_input_datatype_of_the_mixed_model_over_http_and_grpc(http, grpc, reference):
    rows = reference.features[:500]
    expected = reference.xgb.predict_proba(rows)
    arrays = mixed_type_inputs(rows)
    for binary in (False, True):
        requested = [tritonhttp.InferRequestedOutput("probabilities", binary_data=binary)]
        result = http.infer("mixed_types", _inputs(tritonhttp, arrays, binary=binary), outputs=requested)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=SCORE_ATOL)
        assert result.as_numpy("label") is None  # only the requested output comes back
    result = grpc.infer("mixed_types", _inputs(tritongrpc, arrays), outputs=[tritongrpc.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=SCORE_ATOL)


def test_concurrent_requests_score_identically_to_alone(server, reference):
    rows = reference.features[:200]
    url = f"http://{server.http_url}/v2/models/xgb_fraud/infer"

    def body(row: np.ndarray) -> dict:
        return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 12], "data": row.tolist()}],
                "outputs": [{"name": "probabilities"}]}  # fmt: skip

    async def main():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            alone = [(await client.post(url, json=body(row))).json() for row in rows]
            together = await asyncio.gather(*(client.post(url, json=body(row)) for row in rows))
            return alone, [r.json() for r in together]

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together):
        assert a["outputs"][0]["data"] == b["outputs"][0]["data"]  # bit-identical floats
    np.testing.assert_allclose(
        np.array([a["outputs"][0]["data"] for a in alone]), reference.xgb.predict_proba(rows), rtol=0, atol=SCORE_ATOL
    )
    # Per-model metrics: request count, queue and compute time, batch size (requests) and rows per batch.
    series: list[tuple[str, dict[str, str], float]] = []
    for line in httpx.get(f"http://{server.http_url}/metrics").text.splitlines():
        match = re.fullmatch(r"(inferd:[\w:]+)\{(.*)\} (\S+)", line)
        if match:
            series.append((match.group(1), dict(re.findall(r'(\w+)="([^"]*)"', match.group(2))), float(match.group(3))))

    def value(name: str, **labels: str) -> float:
        wanted = {"model_name": "xgb_fraud", "kind": "tabular", **labels}
        return sum(v for n, found, v in series if n == name and all(found.get(k) == w for k, w in wanted.items()))

    assert value("inferd:requests_total", status="ok") >= 2 * len(rows)
    num_batches = value("inferd:batch_size_count")
    assert 0 < num_batches < 2 * len(rows)  # the concurrent requests were merged
    assert value("inferd:batch_size_sum") >= 2 * len(rows)  # requests per batch, summed
    assert value("inferd:batch_compute_time_seconds_count") == num_batches
    assert value("inferd:batch_queue_time_seconds_count") >= 2 * len(rows)  # one per request


# ---------------------------------------------------------------------------------------------- bad input


def _post(server: OIPServer, path: str, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"http://{server.http_url}{path}", content=content, headers=headers or {}, timeout=30)


def _tensor(name="input", datatype="FP32", shape=(1, 12), data=None) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": data if data is not None else [0.5] * 12}


def test_bad_requests_get_oip_errors_naming_the_input(server):
    path = "/v2/models/xgb_fraud/infer"
    cases = [
        ({"inputs": [_tensor(shape=(1, 11), data=[0.5] * 11)]}, 400, "input 'input': shape [1, 11] does not match the model's [-1, 12]"),
        ({"inputs": [_tensor(datatype="FP64")]}, 400, "input 'input': datatype FP64 given, the model takes FP32"),
        ({"inputs": [_tensor(name="features")]}, 400, "unexpected input(s) ['features']"),
        ({"inputs": [_tensor(), _tensor(name="extra")]}, 400, "unexpected input(s) ['extra']"),
        ({"inputs": [_tensor(data=[0.5] * 11)]}, 400, "input 'input': data has 11 elements but shape [1, 12] needs 12"),
        ({"inputs": [_tensor(shape=(20001, 12), data=[0.5] * 12 * 20001)]}, 400, "input 'input': batch size 20001 is outside [1, max_batch_size 20000]"),
        ({"inputs": [_tensor(data=[0.5] * 11 + ["x"])]}, 400, "input 'input': datatype FP32 takes numbers"),
        ({"inputs": []}, 400, "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "input", "shape": [1, 12], "data": [0.5] * 12}]}, 400, "input 'input': 'datatype' is required"),
        ({"inputs": [_tensor()], "outputs": [{"name": "score"}]}, 400, "unknown output(s) ['score']"),
    ]
    for body, status, message in cases:
        response = _post(server, path, json.dumps(body))
        assert response.status_code == status, (body, response.text)
        assert response.json() == {"error": response.json()["error"]} and message in response.json()["error"], response.text
    missing = _post(server, "/v2/models/mixed_types/infer", json.dumps({"inputs": [_tensor(name="numeric", shape=(1, 10), data=[0.5] * 10)]}))
    assert missing.status_code == 400 and "missing input(s) ['merchant_category', 'card_present']" in missing.json()["error"]
    nan = _post(server, path, '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 12], "data": [NaN, 1,1,1,1,1,1,1,1,1,1,1]}]}')
    assert nan.status_code == 400 and "input 'input': NaN is not allowed" in nan.json()["error"]
    malformed = _post(server, path, '{"inputs": [')
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]
    unknown_model = _post(server, "/v2/models/nope/infer", json.dumps({"inputs": [_tensor()]}))
    assert unknown_model.status_code == 404 and "unknown model 'nope'" in unknown_model.json()["error"]
    unknown_version = _post(server, "/v2/models/xgb_fraud/versions/7/infer", json.dumps({"inputs": [_tensor()]}))
    assert unknown_version.status_code == 404 and "no version '7'" in unknown_version.json()["error"]
    # The server keeps serving.
    ok = _post(server, path, json.dumps({"inputs": [_tensor()]}))
    assert ok.status_code == 200 and ok.json()["outputs"][1]["shape"] == [1, 2]


def test_bad_grpc_requests_get_status_codes(grpc):
    tensor = tritongrpc.InferInput("input", [1, 11], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 11), np.float32))
    with pytest.raises(InferenceServerException) as info:
        grpc.infer("xgb_fraud", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "shape [1, 11]" in info.value.message()
    tensor = tritongrpc.InferInput("input", [1, 12], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 12), np.float32))
    with pytest.raises(InferenceServerException) as info:
        grpc.infer("xgb_fraud", [tensor], model_version="9")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert grpc.infer("xgb_fraud", [tensor]).as_numpy("probabilities").shape == (1, 2)


# ---------------------------------------------------------------------------------------------- repository


def test_repository_index_load_and_unload(http, grpc, reference):
    index = {(m["name"], m.get("version")): m["state"] for m in http.get_model_repository_index()}
    assert index[("xgb_fraud", "1")] == "READY" and index[("lgbm_fraud", "1")] == "READY"
    http.unload_model("lgbm_fraud")
    assert not http.is_model_ready("lgbm_fraud")
    index = {m["name"]: m["state"] for m in http.get_model_repository_index()}
    assert index["lgbm_fraud"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException, match="unknown model 'lgbm_fraud'"):
        http.infer("lgbm_fraud", _inputs(tritonhttp, {"input": reference.features[:2]}))
    grpc.load_model("lgbm_fraud")
    assert grpc.is_model_ready("lgbm_fraud")
    result = grpc.infer("lgbm_fraud", _inputs(tritongrpc, {"input": reference.features[:100]}))
    np.testing.assert_allclose(result.as_numpy("probabilities")[:, 1], reference.lgbm.predict(reference.features[:100]), rtol=0, atol=SCORE_ATOL)
    grpc.unload_model("lgbm_fraud")
    assert "lgbm_fraud" in [m.name for m in grpc.get_model_repository_index().models if m.state == "UNAVAILABLE"]
    http.load_model("lgbm_fraud")
    assert http.is_model_ready("lgbm_fraud")
    with pytest.raises(InferenceServerException, match="no model 'nope' in the repository"):
        http.load_model("nope")


def test_unload_lets_requests_in_flight_finish(server, reference):
    """slow_batch waits 400 ms for a batch to fill: requests sent before the unload are queued when it arrives."""
    url = f"http://{server.http_url}"
    rows = reference.features[:8]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            body = lambda row: {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 12], "data": row.tolist()}]}  # noqa: E731
            in_flight = [asyncio.ensure_future(client.post("/v2/models/slow_batch/infer", json=body(row))) for row in rows]
            await asyncio.sleep(0.15)
            unload = await client.post("/v2/repository/models/slow_batch/unload")
            answers = await asyncio.gather(*in_flight)
            after = await client.post("/v2/models/slow_batch/infer", json=body(rows[0]))
            reload = await client.post("/v2/repository/models/slow_batch/load")
            return unload, answers, after, reload

    unload, answers, after, reload = asyncio.run(main())
    assert unload.status_code == 200, unload.text
    assert [a.status_code for a in answers] == [200] * len(rows), [a.text for a in answers]
    scores = np.array([a.json()["outputs"][1]["data"] for a in answers])
    np.testing.assert_allclose(scores, reference.xgb.predict_proba(rows), rtol=0, atol=SCORE_ATOL)
    assert after.status_code == 404 and reload.status_code == 200


def test_an_llm_and_tabular_models_in_one_server(inferd_home, tmp_path, reference):
    """`--model LLM --model-repository DIR`: both kinds answer; OIP names the LLM's kind instead of serving it."""
    from tests.server_fixtures import DEFAULT_MODEL, SMALL_SERVER_ARGS

    repo = tmp_path / "repo"
    (repo / "fraud" / "1").mkdir(parents=True)
    reference.xgb.get_booster().save_model(str(repo / "fraud" / "1" / "model.json"))
    server = start_oip_server(repo, ("--model", DEFAULT_MODEL, *SMALL_SERVER_ARGS))
    try:
        base = f"http://{server.http_url}"
        kinds = {m["id"]: m.get("kind") for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert kinds == {DEFAULT_MODEL: "generate", "fraud": "tabular"}
        completion = httpx.post(f"{base}/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=120)
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 2
        client = tritonhttp.InferenceServerClient(server.http_url)
        result = client.infer("fraud", _inputs(tritonhttp, {"input": reference.features[:50]}, binary=False))
        np.testing.assert_allclose(result.as_numpy("probabilities"), reference.xgb.predict_proba(reference.features[:50]), rtol=0, atol=SCORE_ATOL)
        wrong_kind = httpx.get(f"{base}/v2/models/{DEFAULT_MODEL}")
        assert wrong_kind.status_code == 400 and "is a generate model" in wrong_kind.json()["error"]
    finally:
        stop_inferd_server(server.process)


def test_api_keys_guard_rest_and_grpc_alike(tmp_path, reference):
    """With --api-key, infer over REST (the bare ASGI path before FastAPI) and gRPC both need the key; the health
    probes stay open, as over HTTP. Scores with the key equal the native model's."""
    repo = build_repository(tmp_path / "repo", reference)
    key = "k-" + "7" * 20
    served = start_oip_server(repo, ("--api-key", key))
    rows = reference.features[:3]
    expected = reference.xgb.predict_proba(rows)
    try:
        http_client = tritonhttp.InferenceServerClient(served.http_url)
        with pytest.raises(InferenceServerException, match="API key"):
            http_client.infer("xgb_fraud", _inputs(tritonhttp, {"input": rows}))
        with pytest.raises(InferenceServerException, match="API key"):
            http_client.infer("xgb_fraud", _inputs(tritonhttp, {"input": rows}), headers={"Authorization": "Bearer nope"})
        answer = http_client.infer("xgb_fraud", _inputs(tritonhttp, {"input": rows}),
                                   headers={"Authorization": f"bearer {key}"})  # the scheme in any case
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=0, atol=SCORE_ATOL)
        http_client.close()

        grpc_client = tritongrpc.InferenceServerClient(served.grpc_url)
        assert grpc_client.is_server_live() and grpc_client.is_server_ready()
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            grpc_client.infer("xgb_fraud", _inputs(tritongrpc, {"input": rows}))
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            grpc_client.get_model_metadata("xgb_fraud")
        answer = grpc_client.infer("xgb_fraud", _inputs(tritongrpc, {"input": rows}),
                                   headers={"authorization": f"Bearer {key}"})
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=0, atol=SCORE_ATOL)
        grpc_client.close()
    finally:
        stop_inferd_server(served.process)
