#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels a GPU box without internet needs for
# the peers' rows (benchmarks/first_light.sh, bench_core.py; see benchmarks/README.md) into
# .whl/, installed there with --target into a side folder. prefops itself is never installed:
# the scripts put the checkout on PYTHONPATH.
#   liger-kernel, cut-cross-entropy   their only dependencies, torch and triton, are the box's own
#   trl                               its fused head (trl.kernels); its backward imports trl.trainer.utils,
#                                     hence datasets, and datasets' dill and multiprocess, which the
#                                     box lacks (every other dependency is in its image)
# All are pure-Python wheels: the manylinux tags below only select cp312 x86-64 builds
# should a later version ship compiled wheels. Keep one version of each: two stop the install.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1
          multiprocess==0.70.19)

mkdir -p .whl
for spec in "${PACKAGES[@]}"; do
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$spec"
done
ls -1 .whl/*.whl
