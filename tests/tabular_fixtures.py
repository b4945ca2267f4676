"""Small real tabular models for the tabular and OIP tests, trained here from the seeded fraud data:

    xgb_fraud      XGBoost (JSON file), 12 FP32 features, config.pbtxt with dynamic batching
    xgb_ubj        the same booster saved as UBJSON, no config (derived from the graph)
    lgbm_fraud     LightGBM text file, no config
    sk_logreg      sklearn LogisticRegression exported by skl2onnx (FP32 input, label + probabilities)
    mixed_types    an ONNX graph taking FP32 [n, 10], INT64 [n, 1] and BOOL [n, 1] inputs (cast and concatenated
                   in front of the xgb_fraud trees), so every input datatype of the example is exercised

`build_repository(dir)` writes them in Triton's layout and returns the native models for reference scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from examples.fraud.transactions import NUM_FEATURES, make_transactions

XGB_CONFIG = """
name: "xgb_fraud"
backend: "onnxruntime"
max_batch_size: 20000
input [ { name: "input" data_type: TYPE_FP32 dims: [ 12 ] } ]
output [
  { name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape { shape: [ ] } },
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 2 ] }
]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "allow_nan" value: { string_value: "false" } }
"""


@dataclass
class Reference:
    xgb: Any  # xgboost.XGBClassifier
    lgbm: Any  # lightgbm.Booster
    logreg: Any  # sklearn LogisticRegression
    features: np.ndarray  # [n, 12] float32 holdout rows


def train(num_train_rows: int = 20000, num_trees: int = 60) -> Reference:
    import lightgbm
    import xgboost
    from sklearn.linear_model import LogisticRegression

    features, labels = make_transactions(num_train_rows, seed=1)
    xgb = xgboost.XGBClassifier(n_estimators=num_trees, max_depth=5, learning_rate=0.2, n_jobs=1, random_state=0)
    xgb.fit(features, labels)
    lgbm = lightgbm.train(
        {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1, "seed": 0},
        lightgbm.Dataset(features, labels),
        num_boost_round=num_trees,
    )
    logreg = LogisticRegression(max_iter=500).fit(features[:, [0, 3, 5, 6, 8]], labels)
    holdout, _ = make_transactions(10000, seed=2)
    return Reference(xgb, lgbm, logreg, holdout)


def _mixed_types_model(xgb_onnx: bytes) -> bytes:
    """numeric FP32 [n, 10] + merchant_category INT64 [n, 1] + card_present BOOL [n, 1] -> the xgb trees."""
    import onnx
    from onnx import TensorProto, helper

    trees = onnx.load_from_string(xgb_onnx)
    graph = trees.graph
    # Feature order of the trees: 0-1 numeric, 2 merchant_category, 3-7 numeric, 8 card_present, 9-11 numeric.
    split = helper.make_tensor("split", TensorProto.INT64, [3], [2, 5, 3])
    nodes = [
        helper.make_node("Split", ["numeric", "split"], ["num_a", "num_b", "num_c"], axis=1),
        helper.make_node("Cast", ["merchant_category"], ["category_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["card_present"], ["present_f"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["num_a", "category_f", "num_b", "present_f", "num_c"], ["input"], axis=1),
    ]
    inputs = [
        helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["N", 10]),
        helper.make_tensor_value_info("merchant_category", TensorProto.INT64, ["N", 1]),
        helper.make_tensor_value_info("card_present", TensorProto.BOOL, ["N", 1]),
    ]
    new_graph = helper.make_graph(
        nodes + list(graph.node), "mixed_types", inputs, list(graph.output), initializer=[split, *graph.initializer]
    )
    opsets = [o for o in trees.opset_import if o.domain not in ("", "ai.onnx")] + [helper.make_opsetid("", 15)]
    model = helper.make_model(new_graph, opset_imports=opsets)
    model.ir_version = trees.ir_version
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mixed_type_inputs(features: np.ndarray) -> dict[str, np.ndarray]:
    """The 12 features split into the mixed_types model's three inputs."""
    numeric = np.concatenate([features[:, 0:2], features[:, 3:8], features[:, 9:12]], axis=1)
    return {
        "numeric": np.ascontiguousarray(numeric, dtype=np.float32),
        "merchant_category": features[:, 2:3].astype(np.int64),
        "card_present": features[:, 8:9] > 0.5,
    }


def build_repository(root: Path, reference: Reference) -> Path:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    from inferd.tabular.convert import convert_to_onnx

    repo = root / "models"
    (repo / "xgb_fraud" / "1").mkdir(parents=True)
    reference.xgb.get_booster().save_model(str(repo / "xgb_fraud" / "1" / "model.json"))
    (repo / "xgb_fraud" / "config.pbtxt").write_text(XGB_CONFIG)
    (repo / "xgb_ubj" / "3").mkdir(parents=True)
    reference.xgb.get_booster().save_model(str(repo / "xgb_ubj" / "3" / "model.ubj"))
    (repo / "lgbm_fraud" / "1").mkdir(parents=True)
    reference.lgbm.save_model(str(repo / "lgbm_fraud" / "1" / "model.txt"))
    (repo / "sk_logreg" / "1").mkdir(parents=True)
    onnx_model = convert_sklearn(
        reference.logreg, initial_types=[("input", FloatTensorType([None, 5]))], options={"zipmap": False}
    )
    (repo / "sk_logreg" / "1" / "model.onnx").write_bytes(onnx_model.SerializeToString())
    (repo / "mixed_types" / "1").mkdir(parents=True)
    xgb_onnx = convert_to_onnx(repo / "xgb_fraud" / "1" / "model.json")
    (repo / "mixed_types" / "1" / "model.onnx").write_bytes(_mixed_types_model(xgb_onnx))
    assert NUM_FEATURES == 12
    return repo
