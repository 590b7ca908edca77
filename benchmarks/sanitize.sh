#!/usr/bin/env bash
# compute-sanitizer's memcheck and racecheck over every Triton kernel at small shapes (about a
# minute on an H100/H200): benchmarks/sanitize_kernels.py launches each kernel forward and backward.
# Run from the checkout on a GPU box; exits 0 when the sanitizer is not installed (it says so).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer is not installed here: nothing checked"
    exit 0
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PREFOPS_AUTOTUNE=quick
status=0
for tool in memcheck racecheck; do
    echo "== $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
        python3 benchmarks/sanitize_kernels.py || status=1
done
exit $status
