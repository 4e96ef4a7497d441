#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then runs ruff and the whole test suite.
# Kernels run under the Triton interpreter (TRITON_INTERPRET=1) unless the caller sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
