"""Deterministic mode: the same inputs give bitwise the same values and gradients, run after run.

`prefops.settings(deterministic=True)` (or `prefops.configure(deterministic=True)`), and equally
`torch.use_deterministic_algorithms(True)`, change the two places whose order of summation is not
fixed on a GPU:

- per-sequence sums (sequence_sum, the sequence-level objectives' sums of per-token values): a float
  `index_add` runs on CUDA atomics, which add in arrival order. Here it becomes `index_put_` with
  accumulate=True, which CUDA runs by sorting the indices (a stable radix sort) and adding each
  index's values in that order: one sort of the N token indices more per sum.
- the Triton kernels' launch configuration: the autotuner keeps the fastest of several tile shapes
  (vocabulary blocks, for the row kernels), timed in each process, so two processes may pick
  different blocks and round the GEMMs and row sums differently. Here each kernel launches with
  the first configuration of its list, untimed.

The rest is deterministic already on one GPU and software stack: no kernel of prefops uses atomics,
vocabulary splits are combined in a fixed order, cuBLAS GEMMs and torch's reductions are
run-to-run deterministic (set CUBLAS_WORKSPACE_CONFIG=:4096:8 when several streams run GEMMs, as
torch's reproducibility notes say), and every index_add elsewhere adds to distinct rows. On CPU the
default already gives bitwise-equal runs (tests/test_determinism.py).
"""
from __future__ import annotations

import torch

from .config import get_settings


def enabled() -> bool:
    """Deterministic mode: the `deterministic` setting, or torch.use_deterministic_algorithms(True)."""
    return get_settings().deterministic or torch.are_deterministic_algorithms_enabled()


def index_add(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """target.index_add(0, index, source), out of place; in deterministic mode a sorted,
    fixed-order sum (floats only: integer atomics give the same sum in any order)."""
    if target.is_floating_point() and enabled():
        return target.index_put((index,), source, accumulate=True)
    return target.index_add(0, index, source)
