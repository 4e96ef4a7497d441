#!/usr/bin/env bash
# The GPU check of issues 23 and 20, in under 11 minutes on a machine with a CUDA GPU:
#   1. sets up .venv as the project does (scripts/setup.sh test);
#   2. stops at once, with exit status 2, where torch sees no CUDA device;
#   3. runs the kernel tests compiled (TRITON_INTERPRET=0 pytest tests/kernels);
#   3b. runs LightKV through SGLang's real decode CUDA graphs against its eager decode on the GPU (the
#      test_decode_cuda_graphs_on_a_gpu_* tests of tests/adapters/test_sglang_models.py), where SGLang's CUDA
#      kernels (sgl_kernel) are installed; the summary says SKIP where they are not (the pinned set-up's SGLang is
#      its CPU build);
#   4. tunes the LightKV kernels on the llava-next preset, 3 configs each (lightkv autotune);
#   5. runs lightkv bench scoring, kernels and prefill with --out perf/results, so they write the committed results
#      perf/results/<benchmark>-<gpu>.json (with the roofline floors beside the Triton times);
#   6. prints a summary of the steps and the three speed targets as PASS/FAIL (python -m lightkv_perf.roofline
#      --targets, judged from the scoring and prefill results this run wrote).
# Every step runs under `timeout`, capped at its own limit and at what is left of the budget (620 s in all), so a
# slow step is stopped and reported rather than holding up the rest.
#
# Exit status: 0 every step passed and every target PASS; 1 a step failed or ran out of time; 2 no CUDA device
# (nothing checked); 3 every step passed but a target is FAIL (or N/A: e.g. a GPU that is no H100 SXM or H200).
#
# Environment:
#   LIGHTKV_GPU_CHECK_SKIP_SETUP=1  use .venv as it is, without scripts/setup.sh (the tests set it: setup already ran)
#   LIGHTKV_CACHE_DIR               where autotune writes the tuned configs and the benchmarks read them; default a
#                                   fresh temporary folder, so ~/.cache/lightkv is neither read nor changed
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=620
START=$SECONDS
PY=.venv/bin/python
LIGHTKV=.venv/bin/lightkv
SUMMARY=()
FAILED=0

# step NAME LIMIT_S COMMAND...: run COMMAND under timeout (LIMIT_S, or what is left of the budget if less) and
# record how it ended in SUMMARY (and FAILED=1 unless it passed).
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        SUMMARY+=("SKIP  $name: the ${BUDGET_S} s budget is spent")
        FAILED=1
        return 0
    fi
    echo "=== gpu-check: $name (at most ${limit} s) ==="
    local began=$SECONDS status=0
    timeout --kill-after=5 "$limit" "$@" || status=$?
    local took=$((SECONDS - began))
    if ((status == 0)); then
        SUMMARY+=("ok    $name (${took} s)")
    elif ((status == 124 || status == 137)); then
        SUMMARY+=("TIME  $name: stopped after ${limit} s")
        FAILED=1
    else
        SUMMARY+=("FAIL  $name: exit status $status after ${took} s")
        FAILED=1
    fi
}

if [ "${LIGHTKV_GPU_CHECK_SKIP_SETUP:-0}" != 1 ]; then
    step "setup (scripts/setup.sh test)" 150 bash scripts/setup.sh test
    if ((FAILED)); then
        printf '%s\n' "${SUMMARY[@]}" >&2
        exit 1
    fi
fi

cuda=0
timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 10)" || cuda=$?
if ((cuda == 10)); then
    echo "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing to check" >&2
    exit 2
elif ((cuda != 0)); then
    echo "gpu-check: $PY could not ask torch for a CUDA device (exit status $cuda)" >&2
    exit 1
fi

export TRITON_INTERPRET=0
export LIGHTKV_CACHE_DIR="${LIGHTKV_CACHE_DIR:-$(mktemp -d)}"
TAG=$(timeout 60 "$PY" -c "from lightkv_perf.common import device_tag; print(device_tag())")
MARK=$(mktemp)  # results written after this file are this run's
echo "gpu-check: $(timeout 60 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "$TAG")"
echo "gpu-check: tuned configs in $LIGHTKV_CACHE_DIR; results in perf/results/*-$TAG.json"

step "kernel tests, compiled" 170 "$PY" -m pytest -q -p no:cacheprovider tests/kernels
if timeout 60 "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('sgl_kernel') is None)"; then
    step "SGLang decode CUDA graphs (LightKV, triton backend)" 180 "$PY" -m pytest -q -p no:cacheprovider \
        tests/adapters/test_sglang_models.py -k test_decode_cuda_graphs_on_a_gpu
else
    SUMMARY+=("SKIP  SGLang decode CUDA graphs: no sgl_kernel (SGLang's CUDA kernels) in $PY; the pinned set-up \
installs SGLang for the CPU, so install SGLang's CUDA build to run this step")
fi
step "lightkv autotune (llava-next, 3 configs)" 100 "$LIGHTKV" autotune --preset llava-next \
    --kernels scoring.column_lse,scoring.row_sum,window_match,merge_compact --max-configs 3
step "lightkv bench scoring" 75 "$LIGHTKV" bench scoring --out perf/results
step "lightkv bench kernels" 60 "$LIGHTKV" bench kernels --out perf/results
step "lightkv bench prefill" 120 "$LIGHTKV" bench prefill --repeats 3 --out perf/results

FRESH=()
for name in scoring prefill; do
    if [ perf/results/"$name-$TAG".json -nt "$MARK" ]; then
        FRESH+=(perf/results/"$name-$TAG".json)
    fi
done
rm -f "$MARK"

echo "=== gpu-check: summary ($((SECONDS - START)) s) ==="
printf '%s\n' "${SUMMARY[@]}"
echo "=== gpu-check: speed targets ==="
targets=0
if ((${#FRESH[@]})); then
    timeout 30 "$PY" -m lightkv_perf.roofline --targets "${FRESH[@]}" || targets=$?
else
    echo "N/A   no scoring or prefill result from this run: nothing to judge"
    targets=1
fi
if ((FAILED)); then
    exit 1
elif ((targets != 0)); then
    exit 3
fi
exit 0
