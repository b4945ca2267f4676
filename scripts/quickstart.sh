#!/usr/bin/env bash
# First README command: set everything up, pull the embedded default model, and serve it
# (OpenAI-compatible API on http://127.0.0.1:8000; Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/inferd pull smollm2-135m-instruct
echo "--- a first completion (greedy) ---"
.venv/bin/inferd generate --chat-template --prompt "What is the capital of France? Answer in one sentence." --max-tokens 48
if .venv/bin/inferd serve --help >/dev/null 2>&1; then
  echo "--- serving smollm2-135m-instruct on http://127.0.0.1:${PORT:-8000}/v1 ---"
  exec .venv/bin/inferd serve --model smollm2-135m-instruct --port "${PORT:-8000}"
fi
