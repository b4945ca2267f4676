#!/usr/bin/env bash
# Serve the F32 GGUF with llama.cpp's llama-server on $1 (default 8101), pinned to $CPU_LIST, in the foreground.
# A later --model in the extra flags (compare.sh's llamacpp-q4: the Q4_1 GGUF) overrides it.
# 16 slots sharing one KV buffer (continuous batching), F32 KV cache: the same precision as inferd's fp32 run.
#   usage: benchmarks/peers/run_llamacpp.sh [PORT] [extra llama-server flags...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
PORT="${1:-8101}"
shift || true
LLAMA_PARALLEL="${LLAMA_PARALLEL:-16}"
[ -x "$LLAMA_SERVER_BIN" ] || { log "no $LLAMA_SERVER_BIN: run benchmarks/peers/setup_llamacpp.sh"; exit 1; }
[ -f "$MODEL_F32_GGUF" ] || { log "no $MODEL_F32_GGUF: run benchmarks/peers/setup_llamacpp.sh"; exit 1; }
set -x
exec taskset -c "$CPU_LIST" "$LLAMA_SERVER_BIN" \
    --model "$MODEL_F32_GGUF" --alias "$MODEL_NAME" \
    --host "$HOST" --port "$PORT" \
    --threads "$NUM_THREADS" --threads-batch "$NUM_THREADS" \
    --parallel "$LLAMA_PARALLEL" --kv-unified --ctx-size $((CONTEXT_LEN * LLAMA_PARALLEL)) \
    --cache-type-k f32 --cache-type-v f32 \
    --jinja --no-webui "$@"
