#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp that llama-cpp-python's PyPI sdist vendors (PyPI is the only
# source our machines reach), then make the F32 GGUF that matches inferd's fp32 dequantized weights.
# Takes ~8-15 min on 2 cores. Idempotent: a finished step is skipped.
#   usage: benchmarks/peers/setup_llamacpp.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"

mkdir -p "$PEERS_DIR/src" "$PEERS_DIR/models"

if [ ! -f "$LLAMACPP_SRC/CMakeLists.txt" ]; then
    log "downloading llama-cpp-python==$LLAMACPP_PY_VERSION sdist"
    "$INFERD_PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMACPP_PY_VERSION" \
        -d "$PEERS_DIR/src"
    tar -xzf "$PEERS_DIR/src/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz" -C "$PEERS_DIR/src"
fi

if [ ! -x "$LLAMA_SERVER_BIN" ]; then
    log "configuring llama.cpp in $LLAMACPP_BUILD"
    # PREBUILT_UI=OFF: the default downloads the web UI at build time, which has no network here.
    # OPENSSL=OFF: the server only listens on localhost.  GGML_NATIVE=ON: tuned for this CPU, like torch's kernels.
    cmake -S "$LLAMACPP_SRC" -B "$LLAMACPP_BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DGGML_NATIVE=ON
    log "building llama-server (-j$(nproc))"
    cmake --build "$LLAMACPP_BUILD" --target llama-server -j "$(nproc)"
fi
"$LLAMA_SERVER_BIN" --version 2>&1 | head -n 3 >&2

if [ ! -f "$MODEL_F32_GGUF" ]; then
    log "dequantizing $MODEL_Q4_GGUF -> $MODEL_F32_GGUF"
    "$INFERD_PYTHON" "$(dirname "$0")/dequantize_gguf.py" "$MODEL_Q4_GGUF" "$MODEL_F32_GGUF"
fi
log "llama.cpp ready: $LLAMA_SERVER_BIN, model $MODEL_F32_GGUF"
