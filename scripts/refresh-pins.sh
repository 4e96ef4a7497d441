#!/usr/bin/env bash
# Moves the pins (scripts/constraints.txt) to the newest releases, but only if the whole suite passes on them.
# Builds .venv-refresh from scratch with every package at the newest release pip resolves, except the pins
# the header of constraints.txt gives a reason for (torch, SGLang and what SGLang declares), runs ruff and
# pytest there, and only when both pass rewrites constraints.txt with that venv's versions (same header).
# Afterwards: scripts/test-compat.sh, then TESTED_TRANSFORMERS in adapters/hf/versions.py and the README's
# support table if the newest transformers moved.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-refresh
rm -rf "$VENV"
python3 -m venv "$VENV"
grep -E "^(torch|torchvision|sglang|compressed-tensors|apache-tvm-ffi|lmms-eval|filelock)==" scripts/constraints.txt > "$VENV/deliberate.txt"
PIP=("$VENV/bin/python" -m pip -qq install -c "$VENV/deliberate.txt")
"${PIP[@]}" torch
"${PIP[@]}" --no-warn-conflicts -e ".[dev,hf,perf]" -r scripts/sglang-cpu.txt
"${PIP[@]}" --no-deps sglang compressed-tensors
"${PIP[@]}" --no-warn-conflicts -r scripts/lmms-eval-cpu.txt
"${PIP[@]}" --no-deps lmms-eval
"${PIP[@]}" --no-deps --target "$VENV/sglang-live" torchvision
export TRITON_INTERPRET=1
if "$VENV/bin/python" -m ruff check . && "$VENV/bin/python" -m pytest -q -p no:cacheprovider; then
    "$VENV/bin/python" scripts/pins.py freeze scripts/constraints.txt > "$VENV/constraints.txt"
    mv "$VENV/constraints.txt" scripts/constraints.txt
    git diff --stat -- scripts/constraints.txt
    echo "refresh-pins: the suite passed; scripts/constraints.txt now pins the versions above"
else
    echo "refresh-pins: the suite failed on the newest releases; scripts/constraints.txt is unchanged" >&2
    exit 1
fi
