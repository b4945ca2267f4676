#!/usr/bin/env bash
# Serve the default model with inferd (CPU, float32 activations) on $1 (default 8100), pinned to $CPU_LIST, in the
# foreground. It loads the Q4_1 GGUF and by default keeps its Q4_1/Q8_0 blocks (the weights llama.cpp runs from
# that file); with `--quantization none` (compare.sh's inferd-fp32) it dequantizes them to float32: the weights
# the F32 GGUF and the HF directory hold.
#   usage: benchmarks/peers/run_inferd.sh [PORT] [extra `inferd serve` flags...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${1:-8100}"
shift || true
INFERD_MODEL="${INFERD_MODEL:-$MODEL_Q4_GGUF}"
export OMP_NUM_THREADS="$NUM_THREADS"
set -x
exec taskset -c "$CPU_LIST" "$INFERD_PYTHON" -m inferd.cli serve \
    --model "$INFERD_MODEL" --served-model-name "$MODEL_NAME" \
    --device cpu --dtype float32 --max-model-len "$CONTEXT_LEN" \
    --host "$HOST" --port "$PORT" "$@"
