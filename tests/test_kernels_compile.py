"""Every Triton kernel compiles for an H100 (sm_90), checked on a machine without a GPU.

The interpreter that runs the kernels in the other tests does not type-check them
the way the GPU compiler does; see tests/compile_for_hopper.py.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def compile_for_hopper(*args):
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_for_hopper.py")
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.splitlines()


def test_every_kernel_compiles_for_hopper():
    compiled = [line for line in compile_for_hopper() if line.startswith("ok ")]
    assert len(compiled) >= 20, compiled  # the discovery found the kernels


def test_tile_kernels_compile_to_the_fast_path_on_hopper():
    """As launched on aligned shapes, every autotune config of every GEMM-fused kernel uses
    wgmma and 16-byte asynchronous copies and fits an H100 block's shared memory."""
    report = [line for line in compile_for_hopper("--profile") if line.startswith("profile ")]
    # The script exits non-zero on a config off the fast path; this checks it looked at them all.
    assert len([line for line in report if " hgmma=0 " not in line]) >= 12, report
