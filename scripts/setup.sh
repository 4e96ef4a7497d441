#!/usr/bin/env bash
# Creates .venv with lightkv installed in editable mode, every version pinned by scripts/constraints.txt.
#   scripts/setup.sh demo   the core only (torch, triton, numpy, safetensors, tqdm): what `lightkv demo` needs
#   scripts/setup.sh test   (default) plus the test tools (dev), transformers (hf), matplotlib (perf) and SGLang
# - If the Python that runs this already has a torch (for example a CUDA build), the venv sees it
#   (--system-site-packages) and keeps it: torch, triton and torch's own requirements are then left out of
#   the pins, so that torch's requirements decide them.
# - Otherwise torch==2.13.0 (the pin) is installed first; on the project's CPU machines this takes the local
#   CPU wheel instead of pulling several GB of CUDA packages.
# - SGLang is installed last and with --no-deps: its own pins (torch 2.14, CUDA kernel wheels, ...) would
#   replace the CPU torch. scripts/sglang-cpu.txt lists the small packages its CPU path imports. Its declared
#   requirements (a CUDA server's) are therefore unmet on purpose, and pip would list all of them as
#   "dependency conflicts" whenever a later install touches one of them: the test set-up installs with
#   --no-warn-conflicts. torchvision goes into .venv/sglang-live (see below). The pins themselves come from one
#   resolved, green environment (scripts/refresh-pins.sh).
# pip runs with -qq: only errors are printed (this machine's pip configuration names package folders that do
# not exist, and pip warns about each on every install).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-test}"
case "$MODE" in
    demo | test) ;;
    *) echo "usage: scripts/setup.sh [demo|test] (got '$MODE')" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi
PIP=(.venv/bin/python -m pip -qq)
CONSTRAINTS=.venv/constraints.txt
.venv/bin/python scripts/pins.py for-venv scripts/constraints.txt > "$CONSTRAINTS"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" install -c "$CONSTRAINTS" torch
fi
if [ "$MODE" = demo ]; then
    "${PIP[@]}" install -c "$CONSTRAINTS" -e .
    exit 0
fi
"${PIP[@]}" install --no-warn-conflicts -c "$CONSTRAINTS" -e ".[dev,hf,perf]" -r scripts/sglang-cpu.txt
"${PIP[@]}" install -c "$CONSTRAINTS" --no-deps sglang compressed-tensors
# lmms-eval (lightkv[eval]) likewise --no-deps, with the packages its command line imports (scripts/lmms-eval-cpu.txt).
"${PIP[@]}" install --no-warn-conflicts -c "$CONSTRAINTS" -r scripts/lmms-eval-cpu.txt
"${PIP[@]}" install -c "$CONSTRAINTS" --no-deps lmms-eval
# torchvision for the live SGLang servers only (tests/live/): the image processors SGLang runs use its pure-Python
# transforms, but its compiled ops need a CUDA torch, so it goes --no-deps into a folder of its own that only those
# servers have on their path (tests/live/site/sitecustomize.py defines the two op schemas its import needs).
if ! .venv/bin/python -c "import sys; sys.path.insert(0, '.venv/sglang-live'); import importlib.metadata as m; \
        assert m.version('torchvision') == sys.argv[1]" "$(grep -oP '^torchvision==\K.*' "$CONSTRAINTS")" 2>/dev/null; then
    "${PIP[@]}" install -c "$CONSTRAINTS" --no-deps --upgrade --target .venv/sglang-live torchvision
fi
