#!/usr/bin/env bash
# Serve the fp32 Hugging Face directory with vLLM's CPU build on $1 (default 8102), in the foreground.
#   usage: benchmarks/peers/run_vllm.sh [PORT] [extra vLLM flags...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${1:-8102}"
shift || true
[ -x "$VLLM_VENV/bin/python" ] || { log "no $VLLM_VENV: run benchmarks/peers/setup_vllm.sh"; exit 1; }
[ -f "$MODEL_HF_DIR/config.json" ] || { log "no $MODEL_HF_DIR: run benchmarks/peers/setup_vllm.sh"; exit 1; }
# KV cache GiB; OpenMP threads bound to the same cores as every other server; no core kept back for the frontend.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-$CPU_LIST}"
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
set -x
exec "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_HF_DIR" --served-model-name "$MODEL_NAME" \
    --dtype float32 --max-model-len "$CONTEXT_LEN" --seed 0 \
    --host "$HOST" --port "$PORT" "$@"
