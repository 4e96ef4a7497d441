#!/usr/bin/env bash
# Runs the Transformers adapter's tests against several transformers releases, each in a venv of its own
# (.venv-compat/transformers-VERSION, every other package at its pin), and prints one line per release.
#   scripts/test-compat.sh                  the oldest tested, the pinned and the newest released transformers
#   scripts/test-compat.sh 5.10.0 5.19.0    those releases
# Exit status 0 when every release passes. The oldest and newest tested releases are TESTED_TRANSFORMERS in
# adapters/hf/versions.py; the README's support table is this script's output.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test || exit 1
TESTS=(tests/adapters/test_hf_*.py tests/adapters/test_reference_decoder*.py tests/tools/test_perf_prefill.py)
if [ $# -gt 0 ]; then
    VERSIONS=("$@")
    LABELS=("$@")
else
    oldest=$(.venv/bin/python -c "from lightkv_adapters.hf.versions import TESTED_TRANSFORMERS; print(TESTED_TRANSFORMERS[0])")
    pinned=$(sed -n 's/^transformers==//p' scripts/constraints.txt)
    newest=$(.venv/bin/python -m pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p')
    [ -n "$newest" ] || { echo "test-compat: could not ask the package index for the newest transformers" >&2; exit 1; }
    VERSIONS=("$oldest" "$pinned" "$newest")
    LABELS=("$oldest (oldest tested)" "$pinned (pinned)" "$newest (newest released)")
fi
status=0
for i in "${!VERSIONS[@]}"; do
    version=${VERSIONS[$i]}
    venv=.venv-compat/transformers-$version
    log=$venv/pytest.log
    mkdir -p .venv-compat
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    .venv/bin/python scripts/pins.py without transformers scripts/constraints.txt > "$venv/constraints.txt"
    pip=("$venv/bin/python" -m pip -qq install -c "$venv/constraints.txt")
    if ! { "${pip[@]}" torch && "${pip[@]}" -e ".[dev,hf,perf]" "transformers==$version"; } > "$venv/install.log" 2>&1; then
        echo "transformers ${LABELS[$i]}: INSTALL FAILED (see $venv/install.log)"
        status=1
        continue
    fi
    start=$SECONDS
    TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$log" 2>&1
    result=$?
    summary=$(tail -n 1 "$log" | sed 's/^=* *//; s/ *=*$//')
    if [ $result -eq 0 ]; then
        echo "transformers ${LABELS[$i]}: ok, $summary ($((SECONDS - start)) s)"
    else
        echo "transformers ${LABELS[$i]}: FAILED, $summary (see $log)"
        status=1
    fi
done
exit $status
