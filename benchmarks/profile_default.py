"""Where the default path's time goes at A (stored) and L (sliced): torch.profiler, CUDA time by kernel.

    python benchmarks/profile_default.py [--shapes A,L]
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import SHAPES  # noqa: E402
from prefops.tools.bench import BENCH_ROWS, make_problem, row_problem, row_step  # noqa: E402

import prefops  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="A,L")
    parser.add_argument("--rows", default="default")
    args = parser.parse_args()
    for name in args.shapes.split(","):
        p = make_problem(SHAPES[name], "cuda")
        for key in args.rows.split(","):
            row = BENCH_ROWS[key]
            problem = row_problem(row, p)
            step = row_step(row, problem)
            for _ in range(2):
                step()
                problem.clear_gradients()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
                    problem.clear_gradients()
                torch.cuda.synchronize()
            print(f"== {name} {key} path {prefops.strategy.last_path()}", flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60),
                  flush=True)


if __name__ == "__main__":
    main()
