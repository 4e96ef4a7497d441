#!/usr/bin/env bash
# Creates .venv with lightkv installed in editable mode, plus the test tools (dev), transformers (hf,
# for the Hugging Face parity tests) and matplotlib (perf, for the benchmark plots).
# - If the Python that runs this already has torch (for example a CUDA build), the venv sees it
#   (--system-site-packages) and torch is not reinstalled.
# - Otherwise torch==2.13.0 is installed first; on the project's CPU machines this takes the local
#   CPU wheel instead of pulling several GB of CUDA packages.
# - SGLang 0.5.23 without its CUDA dependencies (scripts/sglang-cpu.txt), for the SGLang adapter's CPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev,hf,perf]"
# SGLang for the CPU tests of the SGLang adapter: without its CUDA dependencies (scripts/sglang-cpu.txt).
# The constraint keeps the torch installed above.
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/torch-constraint.txt
.venv/bin/python -m pip install --quiet --no-deps "sglang==0.5.23" "compressed-tensors==0.18.0"
.venv/bin/python -m pip install --quiet -c .venv/torch-constraint.txt -r scripts/sglang-cpu.txt
