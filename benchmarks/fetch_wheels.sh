#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels a GPU box without
# internet needs for benchmarks/bench_core.py (see benchmarks/README.md):
#   .whl/        the comparison packages, installed with --target into a side folder;
#                their only dependencies, torch and triton, are the box's own.
#   .whl/build/  setuptools and its helpers, so `pip install -e .` can build
#                prefops offline (--no-index --find-links .whl/build).
# All are pure-Python wheels: the manylinux tags below only select cp312 x86-64
# builds should a later version ship compiled wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_PACKAGES=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
BUILD_PACKAGES=(setuptools==84.2.1 wheel==0.48.0 packaging==26.3)

download() {
    local dest=$1
    shift
    mkdir -p "$dest"
    for spec in "$@"; do
        "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$dest" "$spec"
    done
}

download .whl "${BENCH_PACKAGES[@]}"
download .whl/build "${BUILD_PACKAGES[@]}"
ls -1 .whl/*.whl .whl/build/*.whl
