"""Replay holdout transactions through a running server with the official Triton client, one per request.

    python examples/fraud/score.py --holdout /tmp/fraud-holdout.npz --url 127.0.0.1:8000 [--protocol http|grpc]

Prints ROC-AUC / PR-AUC from the served scores beside the native model's on the same transactions,
the largest difference from the native scores, and client-side latency percentiles of the stream.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--holdout", required=True)
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port (the gRPC port for --protocol grpc)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--num-transactions", type=int, default=5000)
    args = parser.parse_args(argv)

    from sklearn.metrics import average_precision_score, roc_auc_score

    if args.protocol == "http":
        import tritonclient.http as triton
    else:
        import tritonclient.grpc as triton  # type: ignore[no-redef]

    holdout = np.load(args.holdout)
    features = holdout["features"][: args.num_transactions]
    labels = holdout["labels"][: args.num_transactions]
    native_scores = holdout["native_scores"][: args.num_transactions]
    client = triton.InferenceServerClient(args.url)
    assert client.is_model_ready(args.model), f"model {args.model!r} is not ready at {args.url}"
    scores = np.empty(len(features), dtype=np.float64)
    latencies_ms = np.empty(len(features))
    requested = [triton.InferRequestedOutput("probabilities")]
    for i, row in enumerate(features):
        tensor = triton.InferInput("input", [1, features.shape[1]], "FP32")
        tensor.set_data_from_numpy(row[None, :])
        started = time.perf_counter()
        result = client.infer(args.model, [tensor], outputs=requested)
        latencies_ms[i] = (time.perf_counter() - started) * 1e3
        scores[i] = result.as_numpy("probabilities")[0, 1]
    p50, p90, p99 = np.percentile(latencies_ms, [50, 90, 99])
    print(f"{len(scores)} transactions over {args.protocol}: {labels.sum()} fraud")
    print(f"served scores: ROC-AUC {roc_auc_score(labels, scores):.4f}  PR-AUC {average_precision_score(labels, scores):.4f}"
          f"  (native XGBoost on the same rows: {roc_auc_score(labels, native_scores):.4f} / "
          f"{average_precision_score(labels, native_scores):.4f})")  # fmt: skip
    print(f"max |served - native XGBoost| = {np.abs(scores - native_scores).max():.2e}")
    print(f"latency per transaction (client side, one at a time): p50 {p50:.3f} ms  p90 {p90:.3f} ms  p99 {p99:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
