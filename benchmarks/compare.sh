#!/usr/bin/env bash
# The serving comparison: inferd vs llama.cpp's llama-server vs vLLM (CPU) vs transformers (offline generate), on
# this machine, the same model. Two precisions, each with its peers: float32 weights (inferd-fp32, llama.cpp on
# the F32 GGUF, vLLM, transformers) and the GGUF file's own Q4_1/Q8_0 blocks (inferd, whose default keeps them;
# llamacpp-q4 on the same file). Each server is measured with `inferd bench serve` at every
# concurrency of $CONCURRENCY; servers alternate across $REPEATS rounds, and each run waits for a quiet CPU first
# (on a shared 2-core machine a busy neighbour slows timings many-fold: check the busy% column before trusting).
# Prints a markdown table and appends it to benchmarks/RESULTS.md; raw JSON, server logs and a plot go to
# benchmarks/.peers/results/<timestamp>/.
#
#   usage: benchmarks/compare.sh [SERVER...]     SERVER: inferd inferd-fp32 llamacpp llamacpp-q4 vllm transformers
#          (default: inferd plus every peer whose setup script has run)
#   setup: benchmarks/peers/setup_llamacpp.sh; benchmarks/peers/setup_vllm.sh (also makes the HF dir transformers uses)
#   env:   CONCURRENCY=1,4,16 NUM_PROMPTS=32 INPUT_LEN=256 OUTPUT_LEN=128 REPEATS=2 SEED=0 NUM_THREADS=2
#          QUIET_BUSY_PERCENT=10 QUIET_WAIT_S=180 READY_TIMEOUT_S=600 RESULTS_MD=benchmarks/RESULTS.md
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")" && pwd)"
source "$BENCH_DIR/peers/common.sh"

CONCURRENCY="${CONCURRENCY:-1,4,16}"
NUM_PROMPTS="${NUM_PROMPTS:-32}"
INPUT_LEN="${INPUT_LEN:-256}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
REPEATS="${REPEATS:-2}"
SEED="${SEED:-0}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
RESULTS_MD="${RESULTS_MD:-$BENCH_DIR/RESULTS.md}"
RUN_DIR="$PEERS_DIR/results/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"

if [ "$#" -gt 0 ]; then
    servers=("$@")
else
    servers=(inferd inferd-fp32)
    [ -x "$LLAMA_SERVER_BIN" ] && servers+=(llamacpp-q4)
    [ -x "$LLAMA_SERVER_BIN" ] && [ -f "$MODEL_F32_GGUF" ] && servers+=(llamacpp)
    [ -x "$VLLM_VENV/bin/python" ] && [ -f "$MODEL_HF_DIR/config.json" ] && servers+=(vllm)
    [ -f "$MODEL_HF_DIR/config.json" ] && servers+=(transformers)
fi
log "servers: ${servers[*]}; concurrency $CONCURRENCY; $REPEATS repeats; results in $RUN_DIR"

port_of() {
    case "$1" in
        inferd) echo 8100 ;;
        llamacpp) echo 8101 ;;
        vllm) echo 8102 ;;
        inferd-fp32) echo 8103 ;;
        llamacpp-q4) echo 8104 ;;
        *) log "unknown server $1 (inferd inferd-fp32 llamacpp llamacpp-q4 vllm transformers)"; return 1 ;;
    esac
}

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        # The run script is a session leader (setsid): signal its whole group, vLLM's engine process included.
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
        sleep 2
    fi
}
trap stop_server EXIT

start_server() {
    local server="$1" port="$2" waited_s=0
    # A variant runs its base server's script: inferd-fp32 with float32 weights, llamacpp-q4 on the Q4_1 GGUF.
    local script="$BENCH_DIR/peers/run_${server%%-*}.sh" extra=()
    case "$server" in
        inferd-fp32) extra=(--quantization none) ;;
        # llama.cpp's best setting that runs: its own defaults for a quantized file (weight repacking on, float16
        # KV cache) over run_llamacpp.sh's float32 cache. Its repacking died with SIGILL on this VM on 2026-11-26;
        # it has run since 2026-12-02 (benchmarks/spec_decode.py). LLAMACPP_Q4_FLAGS="--no-repack" restores that.
        llamacpp-q4) read -r -a q4_flags <<< "${LLAMACPP_Q4_FLAGS:---cache-type-k f16 --cache-type-v f16}"
                     extra=(--model "$MODEL_Q4_GGUF" "${q4_flags[@]}") ;;
    esac
    setsid bash "$script" "$port" "${extra[@]}" > "$RUN_DIR/$server.server.log" 2>&1 &
    SERVER_PID=$!
    until curl -sf -o /dev/null "http://$HOST:$port/health"; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "$server exited while starting; last lines of its log:"
            tail -n 30 "$RUN_DIR/$server.server.log" >&2
            SERVER_PID=""
            return 1
        fi
        sleep 1
        waited_s=$((waited_s + 1))
        if [ "$waited_s" -ge "$READY_TIMEOUT_S" ]; then
            log "$server not ready after ${READY_TIMEOUT_S}s"
            stop_server
            return 1
        fi
    done
    log "$server ready on port $port after ${waited_s}s"
}

bench_args=(--model "$MODEL_NAME" --max-concurrency "$CONCURRENCY" --num-prompts "$NUM_PROMPTS"
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --seed "$SEED" --disable-tqdm)
transformers_args=(--model-dir "$MODEL_HF_DIR" --max-concurrency "$CONCURRENCY" --num-prompts "$NUM_PROMPTS"
                   --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --seed "$SEED" --threads "$NUM_THREADS")

run_one() {
    local server="$1" repeat="$2" out="$RUN_DIR/$1.r$2.json" busy
    busy="$(wait_until_quiet)"
    echo "$server.r$repeat:${busy}%" >> "$RUN_DIR/busy.txt"
    log "$server, repeat $repeat (CPU ${busy}% busy before)"
    if [ "$server" = transformers ]; then
        OMP_NUM_THREADS="$NUM_THREADS" taskset -c "$CPU_LIST" "$INFERD_PYTHON" \
            "$BENCH_DIR/peers/transformers_offline.py" "${transformers_args[@]}" --result-json "$out" \
            | tee -a "$RUN_DIR/bench.log"
        return
    fi
    local port
    port="$(port_of "$server")"
    start_server "$server" "$port" || return 1
    "$INFERD_PYTHON" -m inferd.bench serve --base-url "http://$HOST:$port" --label "$server" "${bench_args[@]}" \
        --result-json "$out" | tee -a "$RUN_DIR/bench.log" || log "bench against $server failed"
    stop_server
}

for repeat in $(seq 1 "$REPEATS"); do
    order=("${servers[@]}")
    if [ $((repeat % 2)) -eq 0 ]; then  # alternate the order so drift in the machine hits every server alike
        order=()
        for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[i]}"); done
    fi
    for server in "${order[@]}"; do
        run_one "$server" "$repeat" || log "$server repeat $repeat failed; see $RUN_DIR/$server.server.log"
    done
done

{
    for server in "${servers[@]}"; do
        if [ "$server" = transformers ]; then
            echo "transformers: OMP_NUM_THREADS=$NUM_THREADS taskset -c $CPU_LIST python benchmarks/peers/transformers_offline.py ${transformers_args[*]}"
        elif [ -f "$RUN_DIR/$server.server.log" ]; then
            echo "$server: $(grep -m1 '^+ exec' "$RUN_DIR/$server.server.log" | sed 's/^+ exec //')"
        fi
    done
    echo "bench: python -m inferd.bench serve --base-url http://$HOST:PORT --label SERVER ${bench_args[*]}"
} > "$RUN_DIR/commands.txt"

shopt -s nullglob
first_results=("$RUN_DIR"/*.r1.json)
if [ "${#first_results[@]}" -gt 0 ]; then
    "$INFERD_PYTHON" -m inferd.bench plot "${first_results[@]}" --out "$RUN_DIR/compare.png" || true
    "$INFERD_PYTHON" "$BENCH_DIR/peers/results_table.py" "$RUN_DIR" | tee -a "$RESULTS_MD"
    log "appended to $RESULTS_MD; plot $RUN_DIR/compare.png"
else
    log "no results"
    exit 1
fi
