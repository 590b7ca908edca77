"""Smoke test of benchmarks/bench_losses.py on CPU: every prefops row computes the loss it claims.

The rows run in fp32 on a tiny odd shape, so each is checked against the float64
chunked reference of its own head at the error model's fp32 tolerances; then the
script's CLI runs once in tiny mode.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import prefops.tools.bench
from conftest import grad_tolerance, value_tolerance

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # bench_losses imports bench_core as a sibling script
import bench_losses  # noqa: E402
from prefops.tools.bench import Shape, make_problem  # noqa: E402

LIGER = importlib.util.find_spec("liger_kernel") is not None
PREFOPS_ROWS = ["naive", "logps", "lean", "logps-budget", "budget"]


@pytest.fixture(autouse=True)
def no_cleanup_between_rows(monkeypatch):
    # attempt() resets dynamo and collects garbage after every row (GPU hygiene): seconds on a 2-core CPU.
    monkeypatch.setattr(prefops.tools.bench, "free_memory", lambda: None)


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto"])
def test_rows_match_float64_reference(loss_type):
    shape = Shape(pairs=3, tokens=21, hidden=19, vocab=203)
    problem = make_problem(shape, torch.device("cpu"), seed=1, dtype=torch.float32)
    args = argparse.Namespace(reps=1, warmup=0)
    results = bench_losses.measure_loss_type(loss_type, problem, [*PREFOPS_ROWS, "liger"], torch.device("cpu"),
                                             args)
    # Loss, dh and dW against float64 of the same inputs. The gradients are measured against
    # themselves, not the magnitudes of their terms: random data cancels little in their sums.
    tokens = problem.targets.numel()
    logit_size = (problem.hidden.detach() @ problem.weight.detach().t()).abs().max().item()
    limits = (value_tolerance(shape.hidden, shape.vocab, tokens),
              *[grad_tolerance(torch.float32, shape.hidden, shape.vocab, tokens, logit_size)] * 2)
    by_key = {result.key: result for result in results}
    for key in PREFOPS_ROWS:
        result = by_key[key]
        assert result.ms is not None, f"{key}: {result.reason}"
        assert all(error <= limit for error, limit in zip(result.errors, limits)), (key, result.errors, limits)
    if not LIGER:
        assert by_key["liger"].reason == "skipped: liger-kernel not installed"
    table = bench_losses.table_rows(loss_type, results, floor_ms=1.0)
    lean = next(row for row in table if row[1] == "prefops lean")
    assert lean[5].startswith(("+", "-")) and lean[5].endswith("×)"), lean


def test_cli_tiny(capsys):
    bench_losses.main(["--device", "cpu", "--tiny", "--loss-types", "orpo", "--rows", "naive,logps,lean,liger",
                       "--reps", "1", "--warmup", "0"])
    report = capsys.readouterr().out
    assert "| orpo | prefops lean |" in report
    assert "failed:" not in report
