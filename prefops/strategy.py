"""The one place that picks the path a fused call runs, and the record of which one ran.

Paths, fastest first (prefops.config explains each):
  stored   3 GEMMs; every row's logit gradient kept, the head once, dh and dW one GEMM each in backward
  chunked  3 GEMMs; each chunk's dh and dW GEMMs in forward
  sliced   4 GEMMs on cuBLAS over vocabulary slices
  lean     fused Triton kernels (4 GEMM-sized passes), the least memory

A strategy (prefops.settings(strategy=...) or a loss's strategy=) chooses among them:
  auto     stored, chunked or sliced, the first whose memory fits `workspace`
  budget   stored or chunked within `budget`; lean (with a warning) when a group does not fit
  sliced   sliced within `workspace`
  lean     lean within the smaller of `workspace` and `lean_workspace`
A per-token op (linear_logprobs, token KL) has no loss groups: every strategy but lean runs it
sliced. A loss coupled across its whole batch cannot run chunk by chunk: auto runs it sliced.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from .config import STRATEGIES, check_choice, get_settings, parse_bytes

PATHS = ("stored", "chunked", "sliced", "lean")

_last_path: Optional[str] = None


def last_path() -> Optional[str]:
    """The path the last fused call ran (one of PATHS), None before any: for logs, benchmarks, compare."""
    return _last_path


def record(path: str) -> str:
    global _last_path
    _last_path = check_choice(path, PATHS, "path")
    return path


class Choice(NamedTuple):
    strategy: str
    """The strategy asked for, resolved against the settings."""
    memory: int
    """Bytes the path may use beyond the gradients."""


def resolve(strategy: Optional[str] = None, budget=None) -> Choice:
    """The strategy a call asked for (None: the settings') and the memory it may use."""
    settings = get_settings()
    strategy = check_choice(strategy or settings.strategy, STRATEGIES, "strategy")
    if strategy == "budget":
        return Choice(strategy, settings.budget if budget is None else parse_bytes(budget))
    if strategy == "lean":
        return Choice(strategy, min(settings.workspace, settings.lean_workspace))
    return Choice(strategy, settings.workspace)


def token_path(strategy: Optional[str] = None) -> tuple[bool, int]:
    """(sliced, workspace) of a per-token op: the lean fused kernels or materialised slices."""
    choice = resolve(strategy)
    if choice.strategy == "lean":
        return False, choice.memory
    return True, get_settings().workspace


def group_paths(choice: Choice) -> tuple[str, ...]:
    """The paths a sequence-level objective tries in order; the first whose plan fits runs."""
    if choice.strategy == "auto":
        return ("stored", "chunked", "sliced")
    if choice.strategy == "budget":
        return ("stored", "chunked", "lean")
    return (choice.strategy,)
