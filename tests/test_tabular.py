"""Tabular engine (inferd/tabular): scores against the native sklearn / XGBoost / LightGBM models, identical
scores batched or alone, Triton config reading and checking, and bad input named by field.

Tolerance: scores within 1e-5 absolute of the native predict_proba. XGBoost sums its leaves in float32 like
onnxruntime does (differences ~1e-7); LightGBM and sklearn compute in float64, and the float32 ONNX graph
differs from them by ~1e-7 on these models.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from inferd.batching import BatchRecord
from inferd.serving import ModelKind, ServedEngine
from inferd.tabular import TabularEngine, TensorError, config_from_pbtxt, decode_tensor, list_repository
from tests.tabular_fixtures import Reference, build_repository, mixed_type_inputs, train

SCORE_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> Reference:
    return train()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reference) -> Path:
    return build_repository(tmp_path_factory.mktemp("tabular"), reference)


def _run(coro):
    return asyncio.run(coro)


async def _infer_all(engine: TabularEngine, inputs: dict[str, np.ndarray], **kwargs):
    engine.start()
    try:
        return await engine.infer(inputs, **kwargs)
    finally:
        engine.shutdown()


def test_import_is_lazy_and_engine_implements_the_seam(repo):
    import subprocess
    import sys

    code = "import sys, inferd.tabular; assert 'onnxruntime' not in sys.modules and 'xgboost' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    engine = TabularEngine.from_path(str(repo / "sk_logreg"), {})
    assert isinstance(engine, ServedEngine) and engine.kind is ModelKind.TABULAR


def test_xgboost_json_scores_match_predict_proba_on_10k_rows(repo, reference):
    engine = TabularEngine.from_path(str(repo / "xgb_fraud"), {})
    result = _run(_infer_all(engine, {"input": reference.features}))
    expected = reference.xgb.predict_proba(reference.features)
    assert result.version == 1
    np.testing.assert_allclose(result.outputs["probabilities"], expected, rtol=0, atol=SCORE_ATOL)
    # reshape { shape: [] }: the model's label is [n], the config's dims [1] make it [n, 1] on the wire.
    assert result.outputs["label"].shape == (10000, 1)
    np.testing.assert_array_equal(result.outputs["label"][:, 0], reference.xgb.predict(reference.features))


def test_xgboost_ubj_with_derived_config(repo, reference):
    engine = TabularEngine.from_path(str(repo / "xgb_ubj"), {})
    config = engine.config()
    assert engine.versions == [3]
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("input", "FP32", (12,))]
    assert [(t.name, t.datatype, t.dims) for t in config.outputs] == [("label", "INT64", ()), ("probabilities", "FP32", (2,))]
    assert config.max_batch_size == 1024 and config.dynamic_batching is not None
    result = _run(_infer_all(engine, {"input": reference.features[:1000]}, output_names=["probabilities"]))
    assert list(result.outputs) == ["probabilities"]
    np.testing.assert_allclose(result.outputs["probabilities"], reference.xgb.predict_proba(reference.features[:1000]), atol=SCORE_ATOL)


def test_lightgbm_text_scores_match_native_predict(repo, reference):
    engine = TabularEngine.from_path(str(repo / "lgbm_fraud"), {"max_batch_size": 10000})
    result = _run(_infer_all(engine, {"input": reference.features}))
    np.testing.assert_allclose(result.outputs["probabilities"][:, 1], reference.lgbm.predict(reference.features), rtol=0, atol=SCORE_ATOL)


def test_sklearn_onnx_scores_match_predict_proba(repo, reference):
    rows = reference.features[:, [0, 3, 5, 6, 8]]
    engine = TabularEngine.from_path(str(repo / "sk_logreg" / "1" / "model.onnx"), {"max_batch_size": 10000})
    result = _run(_infer_all(engine, {"input": rows}))
    np.testing.assert_allclose(result.outputs["probabilities"], reference.logreg.predict_proba(rows), rtol=0, atol=SCORE_ATOL)


def test_mixed_input_datatypes_score_like_the_single_input_model(repo, reference):
    engine = TabularEngine.from_path(str(repo / "mixed_types"), {})
    config = engine.config()
    assert [(t.name, t.datatype) for t in config.inputs] == [("numeric", "FP32"), ("merchant_category", "INT64"), ("card_present", "BOOL")]
    rows = reference.features[:1000]
    result = _run(_infer_all(engine, mixed_type_inputs(rows)))
    np.testing.assert_allclose(result.outputs["probabilities"], reference.xgb.predict_proba(rows), rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("executor", ["loop", "thread"])
def test_concurrent_requests_are_merged_and_score_identically_to_alone(repo, reference, executor):
    records: list[BatchRecord] = []
    options = {"max_queue_delay_us": 20000, "executor": executor}
    engine = TabularEngine.from_path(str(repo / "xgb_fraud"), options, on_batch=records.append)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=48)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    requests = [reference.features[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]

    async def main():
        engine.start()
        try:
            alone = [await engine.infer({"input": rows}) for rows in requests]
            num_alone_batches = len(records)
            together = await asyncio.gather(*(engine.infer({"input": rows}) for rows in requests))
            return alone, num_alone_batches, together
        finally:
            engine.shutdown()

    alone, num_alone_batches, together = _run(main())
    assert num_alone_batches == len(requests) and all(r.num_items == 1 for r in records[:num_alone_batches])
    merged = records[num_alone_batches:]
    assert sum(r.num_items for r in merged) == len(requests) and len(merged) < len(requests)
    assert sum(r.cost for r in merged) == int(sizes.sum())
    for a, b in zip(alone, together):
        for name in ("probabilities", "label"):
            np.testing.assert_array_equal(a.outputs[name], b.outputs[name])  # bit-identical


def test_bad_requests_name_the_input(repo, reference):
    engine = TabularEngine.from_path(str(repo / "xgb_fraud"), {})
    rows = reference.features[:4]
    cases = [
        ({"input": rows[:, :11]}, "shape [4, 11] does not match the model's [-1, 12]"),
        ({"input": rows.astype(np.float64)}, "input 'input': datatype FP64 given, the model takes FP32"),
        ({}, "missing input(s) ['input']"),
        ({"input": rows, "extra": rows}, "unexpected input(s) ['extra']"),
        ({"input": np.zeros((20001, 12), np.float32)}, "batch size 20001 is outside [1, max_batch_size 20000]"),
        ({"input": np.where(np.eye(4, 12) > 0, np.nan, rows).astype(np.float32)}, "input 'input': NaN is not allowed"),
    ]
    for inputs, message in cases:
        with pytest.raises(TensorError) as info:
            engine.prepare(inputs)
        assert message in str(info.value) and info.value.status == 400
    with pytest.raises(TensorError) as info:
        engine.prepare({"input": rows}, version=2)
    assert info.value.status == 404 and "no version 2" in str(info.value)
    with pytest.raises(TensorError, match=r"unknown output\(s\) \['score'\]"):
        engine.check_outputs(["score"])


def test_decode_tensor_is_strict_about_datatypes_and_counts():
    assert decode_tensor("x", "FP32", [2, 2], [[1, 2.5], [3, 4]]).dtype == np.float32
    np.testing.assert_array_equal(decode_tensor("b", "BOOL", [3], [True, False, True]), [True, False, True])
    np.testing.assert_array_equal(decode_tensor("i", "INT64", [1, 2], [7, -8]), [[7, -8]])
    assert decode_tensor("s", "BYTES", [2], ["a", "b"]).tolist() == ["a", "b"]
    bad = [
        (("x", "FP32", [2, 3], [1, 2, 3, 4, 5]), "data has 5 elements but shape [2, 3] needs 6"),
        (("i", "INT64", [2], [1.5, 2]), "datatype INT64 takes integers, got fractional values"),
        (("u", "UINT8", [1], [300]), "outside UINT8's range"),
        (("b", "BOOL", [2], [1, 0]), "datatype BOOL takes true/false"),
        (("x", "FP32", [1], ["1.0"]), "datatype FP32 takes numbers, got string values"),
        (("x", "FP8", [1], [1]), "datatype 'FP8' is not one of"),
        (("x", "FP32", [-1], [1]), "negative dimension"),
    ]
    for args, message in bad:
        with pytest.raises(TensorError) as info:
            decode_tensor(*args)
        assert message in str(info.value), str(info.value)


def test_triton_config_is_read_and_checked_against_the_graph(repo, tmp_path):
    config = config_from_pbtxt(
        """
        # a comment
        name: "m" platform: "onnxruntime_onnx" max_batch_size: 64
        input [{ name: "input", data_type: TYPE_FP32, dims: [ 12 ] }]
        dynamic_batching { preferred_batch_size: [ 16, 32 ] max_queue_delay_microseconds: 100 }
        instance_group [ { count: 2, kind: KIND_CPU } ]
        version_policy: { specific: { versions: [1, 3] } }
        parameters [{ key: "intra_op_thread_count" value: { string_value: "2" } }]
        """,
        model_name="m",
    )
    assert config.max_batch_size == 64 and config.instance_count == 2 and config.intra_op_threads == 2
    assert config.dynamic_batching is not None and config.dynamic_batching.preferred_batch_sizes == (16, 32)
    assert config.dynamic_batching.max_queue_delay_us == 100
    assert config.version_policy.select([1, 2, 3, 4]) == [1, 3]
    with pytest.raises(ValueError, match="differs from the model's directory name"):
        config_from_pbtxt('name: "other"', model_name="m")
    with pytest.raises(ValueError, match="platform 'tensorflow_savedmodel'"):
        config_from_pbtxt('platform: "tensorflow_savedmodel"', model_name="m")

    # A config that disagrees with the graph fails at load, naming the tensor.
    import shutil

    for bad_input, message in [
        ('{ name: "input" data_type: TYPE_FP64 dims: [ 12 ] }', "has data_type FP64 in the config but FP32 in the ONNX graph"),
        ('{ name: "input" data_type: TYPE_FP32 dims: [ 11 ] }', "has dims [11] in the config"),
        ('{ name: "features" data_type: TYPE_FP32 dims: [ 12 ] }', "input 'features' is not in the ONNX graph"),
    ]:
        model_dir = tmp_path / "bad" / "xgb_ubj"
        shutil.rmtree(tmp_path / "bad", ignore_errors=True)
        shutil.copytree(repo / "xgb_ubj", model_dir)
        (model_dir / "config.pbtxt").write_text(f"max_batch_size: 8\ninput [ {bad_input} ]\n")
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            TabularEngine.from_path(str(model_dir), {})


def test_options_are_validated_and_the_repository_is_listed(repo):
    with pytest.raises(ValueError, match=r"unknown tabular option\(s\) \['max_batch'\]; known: \["):
        TabularEngine.from_path(str(repo / "sk_logreg"), {"max_batch": 4})
    with pytest.raises(ValueError, match="max_queue_delay_us must be <= 10000000"):
        TabularEngine.from_path(str(repo / "sk_logreg"), {"max_queue_delay_us": 10_000_001})
    with pytest.raises(ValueError, match="no such model file or directory"):
        TabularEngine.from_path(str(repo / "nope"), {})
    assert list(list_repository(repo)) == ["lgbm_fraud", "mixed_types", "sk_logreg", "xgb_fraud", "xgb_ubj"]


@pytest.mark.parametrize("executor", ["loop", "thread"])
def test_shutdown_lets_queued_requests_finish(repo, reference, executor):
    engine = TabularEngine.from_path(str(repo / "xgb_fraud"), {"max_queue_delay_us": 200000, "executor": executor})

    async def main():
        engine.start()
        tasks = [asyncio.ensure_future(engine.infer({"input": reference.features[i : i + 1]})) for i in range(8)]
        await asyncio.sleep(0.01)  # queued, waiting out the 200 ms delay
        await asyncio.to_thread(engine.shutdown)
        return await asyncio.gather(*tasks)

    results = _run(main())
    expected = reference.xgb.predict_proba(reference.features[:8])
    np.testing.assert_allclose(np.concatenate([r.outputs["probabilities"] for r in results]), expected, atol=SCORE_ATOL)
    assert not engine.is_running


def test_heavy_libraries_are_imported_in_one_module_each():
    import ast

    package = Path(__file__).resolve().parents[1] / "inferd"
    importers: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            func_name = getattr(node.func, "attr", getattr(node.func, "id", "")) if isinstance(node, ast.Call) else ""
            if func_name in ("import_module", "_import") and node.args:  # importlib.import_module("xgboost")
                names = [getattr(node.args[0], "value", "")] if isinstance(node.args[0], ast.Constant) else []
            for name in names:
                top = name.split(".")[0]
                if top in ("onnxruntime", "xgboost", "lightgbm", "onnxmltools"):
                    importers.setdefault(top, set()).add(str(path.relative_to(package)))
    assert importers == {
        "onnxruntime": {"tabular/session.py"},
        **{name: {"tabular/convert.py"} for name in ("xgboost", "lightgbm", "onnxmltools")},
    }


def test_xgboost_regressor_and_lightgbm_multiclass_convert_with_parity(tmp_path, reference):
    import lightgbm
    import xgboost

    features = reference.features[:3000]
    target = features[:, 0] * 0.01 + features[:, 5] * 0.1  # amount and distance: a smooth regression target
    regressor = xgboost.XGBRegressor(n_estimators=30, max_depth=4, n_jobs=1, random_state=0).fit(features, target)
    regressor.get_booster().save_model(str(tmp_path / "reg.json"))
    classes = np.digitize(features[:, 3], [8, 16])  # hour of day -> 3 classes
    multiclass = lightgbm.train({"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1},
                                lightgbm.Dataset(features, classes), num_boost_round=20)  # fmt: skip
    multiclass.save_model(str(tmp_path / "multi.txt"))

    reg_engine = TabularEngine.from_path(str(tmp_path / "reg.json"), {"max_batch_size": 3000})
    assert [t.name for t in reg_engine.config().outputs] == ["variable"]
    result = _run(_infer_all(reg_engine, {"input": features}))
    np.testing.assert_allclose(result.outputs["variable"][:, 0], regressor.predict(features), rtol=1e-5, atol=1e-5)
    multi_engine = TabularEngine.from_path(str(tmp_path / "multi.txt"), {"max_batch_size": 3000})
    result = _run(_infer_all(multi_engine, {"input": features}))
    np.testing.assert_allclose(result.outputs["probabilities"], multiclass.predict(features), rtol=0, atol=SCORE_ATOL)


def test_version_policy_serves_the_chosen_versions(repo, reference, tmp_path):
    import shutil

    model_dir = tmp_path / "two_versions"
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(repo / "lgbm_fraud" / "1" / "model.txt", model_dir / "1" / "model.txt")
    (model_dir / "2").mkdir()
    shutil.copy(repo / "xgb_fraud" / "1" / "model.json", model_dir / "2" / "model.json")
    rows = reference.features[:300]
    assert TabularEngine.from_path(str(model_dir), {}).versions == [2]  # Triton's default: the latest version
    (model_dir / "config.pbtxt").write_text("max_batch_size: 512\nversion_policy: { all { } }\n")
    engine = TabularEngine.from_path(str(model_dir), {})
    assert engine.versions == [1, 2]

    async def main():
        engine.start()
        try:
            return [await engine.infer({"input": rows}, version=v) for v in (1, 2, None)]
        finally:
            engine.shutdown()

    v1, v2, latest = _run(main())
    assert (v1.version, v2.version, latest.version) == (1, 2, 2)
    np.testing.assert_allclose(v1.outputs["probabilities"][:, 1], reference.lgbm.predict(rows), rtol=0, atol=SCORE_ATOL)
    np.testing.assert_allclose(v2.outputs["probabilities"], reference.xgb.predict_proba(rows), rtol=0, atol=SCORE_ATOL)


def test_loop_executor_runs_a_full_batch_without_waiting_out_the_delay(repo, reference):
    records: list[BatchRecord] = []
    # A 9 s queue delay: the four requests below fill the batch (max 4 rows), so it must run at once.
    engine = TabularEngine.from_path(str(repo / "xgb_fraud"), {"max_batch_size": 4, "max_queue_delay_us": 9_000_000},
                                     on_batch=records.append)  # fmt: skip

    async def main():
        engine.start()
        try:
            first = asyncio.ensure_future(engine.infer({"input": reference.features[0:1]}))
            await asyncio.sleep(0.05)  # the first request is queued and waiting out the delay
            rest = [engine.infer({"input": reference.features[i : i + 1]}) for i in range(1, 4)]
            return await asyncio.wait_for(asyncio.gather(first, *rest), timeout=8)
        finally:
            engine.shutdown()

    results = _run(main())
    assert [r.num_items for r in records] == [4]
    np.testing.assert_allclose(np.concatenate([r.outputs["probabilities"] for r in results]),
                               reference.xgb.predict_proba(reference.features[:4]), rtol=0, atol=SCORE_ATOL)  # fmt: skip
