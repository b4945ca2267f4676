"""XGBoost (.json / .ubj) and LightGBM (.txt) model files -> ONNX at load, with a parity check.

The one module that imports xgboost, lightgbm and onnxmltools (lazily). The converted graph has one input
`input` FP32 [batch, num_features] and the converter's outputs: `label` INT64 [batch] and `probabilities`
FP32 [batch, num_classes] for classifiers, `variable` FP32 [batch, 1] for regressors.

Parity: the converted model and the native booster score the same probe rows (per feature: midpoints between
the split thresholds the trees use, values beyond both ends, and NaN as "missing"); they must agree within
PARITY_ATOL + PARITY_RTOL * |native|. Thresholds are float32 in ONNX, so rows are probed away from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inferd.tabular.session import OnnxSession

INPUT_NAME = "input"
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-4
NUM_PROBE_ROWS = 512
_ONNX_OPSET = 15  # the highest onnxmltools 1.16 converts to

CONVERTIBLE_SUFFIXES = {".json": "xgboost", ".ubj": "xgboost", ".txt": "lightgbm"}


def _import(module: str, extra: str = "tabular") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"converting this model needs {module.split('.')[0]}: pip install 'inferd[{extra}]'") from exc


def _load_native(path: Path) -> tuple[str, Any, int]:
    """(framework, booster, num_features)"""
    framework = CONVERTIBLE_SUFFIXES.get(path.suffix)
    if framework == "xgboost":
        xgb = _import("xgboost")
        booster = xgb.Booster()
        try:
            booster.load_model(str(path))
        except Exception as exc:  # noqa: BLE001 - XGBoostError
            raise ValueError(f"{path}: not an XGBoost model file: {exc}") from exc
        return framework, booster, booster.num_features()
    if framework == "lightgbm":
        lgb = _import("lightgbm")
        try:
            booster = lgb.Booster(model_file=str(path))
        except Exception as exc:  # noqa: BLE001 - LightGBMError
            raise ValueError(f"{path}: not a LightGBM model file: {exc}") from exc
        return framework, booster, booster.num_feature()
    raise ValueError(f"{path}: cannot convert a {path.suffix!r} file; convertible: {sorted(CONVERTIBLE_SUFFIXES)}")


def _native_predict(framework: str, booster: Any, rows: np.ndarray) -> np.ndarray:
    if framework == "xgboost":
        xgb = _import("xgboost")
        return np.asarray(booster.predict(xgb.DMatrix(rows, missing=np.nan)))
    return np.asarray(booster.predict(rows))


def _make_dynamic_batch(model: Any) -> None:
    """Converters write a fixed first dimension on some outputs (LightGBM's `label` is [1]); make it the batch."""
    for value_info in list(model.graph.input) + list(model.graph.output):
        dims = value_info.type.tensor_type.shape.dim
        if len(dims) >= 1:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"


def _probe_rows(model: Any, num_features: int, rng: np.random.Generator) -> np.ndarray:
    """[NUM_PROBE_ROWS, num_features] float32 rows that walk many branches of the trees."""
    thresholds: list[list[float]] = [[] for _ in range(num_features)]
    for node in model.graph.node:
        attributes = {a.name: a for a in node.attribute}
        if "nodes_featureids" not in attributes or "nodes_values" not in attributes:
            continue
        for feature, value in zip(attributes["nodes_featureids"].ints, attributes["nodes_values"].floats):
            if 0 <= feature < num_features:
                thresholds[feature].append(value)
    rows = np.empty((NUM_PROBE_ROWS, num_features), dtype=np.float32)
    for feature, values in enumerate(thresholds):
        cuts = np.unique(np.asarray(values, dtype=np.float64))
        if len(cuts) == 0:
            rows[:, feature] = rng.normal(size=NUM_PROBE_ROWS)
            continue
        span = max(float(cuts[-1] - cuts[0]), 1.0)
        candidates = np.concatenate([(cuts[:-1] + cuts[1:]) / 2, [cuts[0] - span, cuts[-1] + span]])
        rows[:, feature] = rng.choice(candidates, size=NUM_PROBE_ROWS)
    rows[rng.random(rows.shape) < 0.02] = np.nan
    return rows


def convert_to_onnx(path: str | Path) -> bytes:
    """The ONNX bytes of an XGBoost/LightGBM file; ValueError when it cannot convert or the scores differ."""
    path = Path(path)
    framework, booster, num_features = _load_native(path)
    onnxmltools_convert = _import("onnxmltools.convert")
    data_types = _import("onnxmltools.convert.common.data_types")
    initial_types = [(INPUT_NAME, data_types.FloatTensorType([None, num_features]))]
    try:
        if framework == "xgboost":
            model = onnxmltools_convert.convert_xgboost(booster, initial_types=initial_types, target_opset=_ONNX_OPSET)
        else:
            model = onnxmltools_convert.convert_lightgbm(
                booster, initial_types=initial_types, target_opset=_ONNX_OPSET, zipmap=False
            )
    except Exception as exc:  # noqa: BLE001 - converters raise many types
        raise ValueError(f"{path}: onnxmltools cannot convert this {framework} model: {exc}") from exc
    _make_dynamic_batch(model)
    model_bytes = model.SerializeToString()
    check_parity(path, framework, booster, num_features, model, model_bytes)
    return model_bytes


def check_parity(path: Path, framework: str, booster: Any, num_features: int, model: Any, model_bytes: bytes) -> None:
    rows = _probe_rows(model, num_features, np.random.default_rng(0))
    session = OnnxSession(model_bytes, device="cpu", intra_op_threads=1)
    names = [t.name for t in session.outputs]
    outputs = dict(zip(names, session.run(names, {INPUT_NAME: rows})))
    native = _native_predict(framework, booster, rows).astype(np.float64)
    if "probabilities" in outputs:
        converted = outputs["probabilities"].astype(np.float64)
        if native.ndim == 1 and converted.ndim == 2 and converted.shape[1] == 2:
            converted = converted[:, 1]
    else:
        converted = outputs[names[0]].astype(np.float64).reshape(native.shape)
    if converted.shape != native.shape:
        raise ValueError(f"{path}: the converted model scores shape {converted.shape}, the {framework} model {native.shape}")
    error = np.abs(converted - native)
    bound = PARITY_ATOL + PARITY_RTOL * np.abs(native)
    if not np.all(error <= bound):
        worst = int(np.argmax(error - bound))
        raise ValueError(
            f"{path}: the ONNX conversion does not match {framework} (max |diff| {error.max():.3g}, row {worst}: "
            f"{converted.flat[worst]:.6g} vs {native.flat[worst]:.6g}); not serving it"
        )
