#!/usr/bin/env bash
# Second README command: set up with the test extras and run the whole test suite.
# Pulled models are cached between runs in $INFERD_HOME (default ~/.cache/inferd-test).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export INFERD_HOME="${INFERD_HOME:-$HOME/.cache/inferd-test}"
.venv/bin/inferd pull smollm2-135m-instruct >/dev/null
exec .venv/bin/python -m pytest -q "$@"
