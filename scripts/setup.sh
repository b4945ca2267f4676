#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with inferd installed (editable).
#   scripts/setup.sh           runtime only
#   scripts/setup.sh test      plus the test references (transformers, openai client, scipy, matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.inferd-installed${extra:+-$extra}"
# Reinstall only when the project's dependency list changed since the last install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # Quiet on success: pip's and the build backend's output goes to a log that is shown only if a step fails.
  log="$(mktemp)"
  trap 'rm -f "$log"' EXIT
  quietly() { "$@" >>"$log" 2>&1 || { cat "$log" >&2; echo "setup: failed: $*" >&2; exit 1; }; }
  # torch first, pinned to the CPU wheel these machines carry; the project's range admits it.
  .venv/bin/python -m pip install --quiet "torch==2.13.0" >>"$log" 2>&1 || quietly .venv/bin/python -m pip install --quiet "torch>=2.4,<2.14"
  if [ -n "$extra" ]; then
    quietly .venv/bin/python -m pip install --quiet -e ".[$extra]"
  else
    quietly .venv/bin/python -m pip install --quiet -e .
  fi
  touch "$stamp"
fi
# Compile the CPU kernels (block-quantized matmuls) now rather than at the first model load; one build per machine family.
.venv/bin/python -c "from inferd.kernels import cpu_kernels_available as ok, kernel_build_error as err; import sys; ok() or print('inferd: CPU kernels unavailable, float32 weights will be used:', err(), file=sys.stderr)"
