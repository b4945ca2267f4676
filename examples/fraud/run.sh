#!/usr/bin/env bash
# Train the fraud model, serve it from a Triton-layout repository, replay holdout transactions through tritonclient
# over HTTP and gRPC.   usage: examples/fraud/run.sh [WORK_DIR]   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/../.."
work_dir="${1:-/tmp/inferd-fraud}"
python="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
http_port="${HTTP_PORT:-8000}"
grpc_port="${GRPC_PORT:-8001}"

"$python" examples/fraud/train.py --repository "$work_dir/repo"
"$python" -c "import sys; from inferd.cli import main; sys.exit(main())" serve --model-repository "$work_dir/repo" \
  --host 127.0.0.1 --port "$http_port" --grpc-port "$grpc_port" > "$work_dir/serve.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  if curl -sf "http://127.0.0.1:$http_port/v2/models/fraud/ready" > /dev/null; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then cat "$work_dir/serve.log"; exit 1; fi
  sleep 0.5
done
"$python" examples/fraud/score.py --holdout "$work_dir/fraud-holdout.npz" --url "127.0.0.1:$http_port" --protocol http
"$python" examples/fraud/score.py --holdout "$work_dir/fraud-holdout.npz" --url "127.0.0.1:$grpc_port" --protocol grpc
