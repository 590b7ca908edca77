"""benchmarks/kernel_sweep.py: its CPU dry run over every GEMM-fused kernel, the check that catches a config
leaving outputs unwritten, and its time guard."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_sweep  # noqa: E402


@pytest.mark.slow
def test_cpu_dry_run_times_every_gemm_kernel_at_every_shape(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for --device cpu
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sweep.py"), "--device", "cpu", "--tiny",
                           "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "kernel-sweep.jsonl").read_text().splitlines()]
    assert {r["shape"] for r in records if r["kind"] == "cublas"} == set("AQL")
    timed = {(r["kernel"], r["shape"]) for r in records if r["kind"] == "config" and r.get("ms") and not r["reason"]}
    assert timed == {(name, shape) for name in kernel_sweep.SETUPS for shape in "AQL"}, records
    assert not [r for r in records if r.get("reason")], "a kernel without a setup, or a failed launch"
    report = (tmp_path / "kernel-sweep.md").read_text()
    assert "CPU DRY RUN" in report and "logits_stats_kernel at A:" in report
    assert report.strip() in done.stdout


@triton.jit
def half_written_kernel(x_ptr, out_ptr, n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offsets < (n // 2 if HALF else n)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2.0, mask=mask)


toy_kernel = triton.autotune(configs=[triton.Config({"BLOCK_N": 32, "BLOCK_K": 16, "HALF": False}),
                                      triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "HALF": False}),
                                      triton.Config({"BLOCK_N": 32, "BLOCK_K": 16, "HALF": True})],
                             key=["n"])(half_written_kernel)


def launch_toy(ops):
    n = ops.rows.numel()
    out = torch.empty(n, device=ops.hidden.device)
    toy_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](torch.randn(n, device=ops.hidden.device), out, n)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the toy kernel under the interpreter")
def test_each_config_runs_raw_and_one_that_leaves_outputs_unwritten_shows():
    records = []
    shape = kernel_sweep.shapes(tiny=True)["A"]
    ops = kernel_sweep.make_operands(shape, torch.device("cpu"))
    clock = kernel_sweep.Clock(time.time() + 60, "cpu")
    timing = type("Timing", (), {"reps": 1, "warmup": 0})
    kernel_sweep.sweep_kernel_shape("toy_kernel", toy_kernel, toy_kernel.fn, 1, launch_toy, "A", ops,
                                    {"bf16_ms": 1.0, "fp32_out_ms": None}, torch.device("cpu"), timing, clock,
                                    lambda **record: records.append(record), set())
    assert [r["config"] for r in records] == [
        f"BLOCK_N={n} BLOCK_K=16 HALF={half} warps=4 stages=3" for n, half in ((32, False), (16, False), (32, True))]
    first, second, third = records
    assert first["rel_diff"] is None and first["reason"] is None and first["ms"] > 0
    assert second["rel_diff"] == 0.0 and second["reason"] is None, "another block size, the same output"
    assert third["rel_diff"] == float("inf") and "unwritten" in third["reason"]
    assert toy_kernel.cache == {}, "the sweep runs the raw kernel, never the autotuner"


def test_a_step_starts_only_with_its_time_left():
    records = []
    kernel_sweep.sweep(torch.device("cpu"), kernel_sweep.shapes(tiny=True), deadline=time.time() - 1, reps=1,
                       warmup=0, log=lambda **record: records.append(record), kernels=["logits_stats_kernel"])
    assert [r["reason"][:22] for r in records] == ["skipped: out of time ("] * 3
    with pytest.raises(ValueError, match="kernels: unknown fast_kernel; GEMM-fused kernels: logits_stats_kernel"):
        kernel_sweep.sweep(torch.device("cpu"), {}, deadline=time.time(), reps=1, warmup=0, log=print,
                           kernels=["fast_kernel"])
