"""Train the fraud model and export it to a Triton-layout model repository.

    python examples/fraud/train.py --repository /tmp/fraud-repo [--num-rows 200000] [--num-trees 200]

Writes
    <repository>/fraud/1/model.json     the XGBoost booster (inferd converts it to ONNX at load, with a parity check)
    <repository>/fraud/config.pbtxt     12 FP32 features in, label + probabilities out, dynamic batching
    <repository>/../fraud-holdout.npz   holdout features and labels for score.py (seed 2, not seen in training)
and prints the native model's holdout ROC-AUC / PR-AUC, the figures score.py must reproduce through the server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.fraud.transactions import FEATURE_NAMES, NUM_FEATURES, make_transactions  # noqa: E402

CONFIG = f"""# The fraud model: {NUM_FEATURES} FP32 features per transaction ({", ".join(FEATURE_NAMES)}).
name: "fraud"
backend: "onnxruntime"
max_batch_size: 256
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {NUM_FEATURES} ] }} ]
output [
  {{ name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape {{ shape: [ ] }} }},
  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 2 ] }}
]
# Requests that arrive while a batch runs form the next batch; none waits for company.
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--num-rows", type=int, default=200_000)
    parser.add_argument("--num-trees", type=int, default=200)
    parser.add_argument("--num-holdout-rows", type=int, default=50_000)
    args = parser.parse_args(argv)

    import xgboost
    from sklearn.metrics import average_precision_score, roc_auc_score

    features, labels = make_transactions(args.num_rows, seed=1)
    holdout_features, holdout_labels = make_transactions(args.num_holdout_rows, seed=2)
    print(f"train: {len(labels)} transactions, {labels.mean():.2%} fraud; holdout {len(holdout_labels)}, "
          f"{holdout_labels.mean():.2%} fraud")  # fmt: skip
    model = xgboost.XGBClassifier(
        n_estimators=args.num_trees, max_depth=6, learning_rate=0.05, subsample=0.8, colsample_bytree=0.8,
        eval_metric="aucpr", random_state=0, n_jobs=2,
    )  # fmt: skip
    model.fit(features, labels)
    scores = model.predict_proba(holdout_features)[:, 1]
    print(f"native XGBoost holdout: ROC-AUC {roc_auc_score(holdout_labels, scores):.4f}  "
          f"PR-AUC {average_precision_score(holdout_labels, scores):.4f}")  # fmt: skip

    version_dir = args.repository / "fraud" / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    model.get_booster().save_model(str(version_dir / "model.json"))
    (args.repository / "fraud" / "config.pbtxt").write_text(CONFIG)
    holdout_path = args.repository.parent / "fraud-holdout.npz"
    np.savez(holdout_path, features=holdout_features, labels=holdout_labels, native_scores=scores)
    print(f"wrote {version_dir / 'model.json'}, {args.repository / 'fraud' / 'config.pbtxt'}, {holdout_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
