"""Global settings for the fused ops: strategy, memory workspace, backend.

Every strategy gives the same values and gradients (each within the error model of fp32
logits from input-dtype operands); they differ in time and memory. prefops.strategy holds
the one place that picks the path a call runs (and records it: prefops.strategy.last_path).

`auto` (the default) takes the fastest exact path whose memory beyond the gradients fits
`workspace` (default 2 GiB), in order:
  stored   3 GEMMs: cuBLAS materialises the fp32 logits of whole loss groups (a pair, a
           list) a chunk at a time, the head runs on them, and every chunk's logit gradient
           is kept in the input dtype; backward runs one dh GEMM and one dW GEMM over all of
           them (dW written once).
  chunked  3 GEMMs, when the kept gradients would not fit: each chunk's dh and dW GEMMs run
           in forward, dW accumulating over the chunks.
  sliced   4 GEMMs on cuBLAS, when one group's logits do not fit (one long pair, a large
           list): vocabulary slices of all rows, an online-logsumexp fold in forward; in
           backward each slice is recomputed, its dW written once and dh accumulated in fp32.
`budget` is the 3-GEMM choice alone within `budget` bytes (stored, else chunked; lean when
a group does not fit). `sliced` is the 4-GEMM path within `workspace`. `lean` keeps memory
independent of sequence length and batch size within `lean_workspace` (fused Triton kernels
hold the logits in registers; backward recomputes them): the least memory, not the fastest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

STRATEGIES = ("auto", "budget", "sliced", "lean")
BACKENDS = ("auto", "triton", "torch")

_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


@dataclasses.dataclass
class Settings:
    strategy: str = "auto"
    budget: int = 1 << 30
    backend: str = "auto"
    # Memory beyond the gradients that `auto` and `sliced` may use.
    workspace: int = 2 << 30
    # Scratch memory for lean: the fp32 dh accumulator of one row chunk plus one tile of logit
    # gradients, fixed so that memory never grows with N. Lean uses the smaller of the two.
    lean_workspace: int = 160 << 20
    # Keep an fp32 copy of W.grad across row chunks even for bf16/fp16 weights
    # (exact, but costs V*H*4 bytes). Off: each row chunk's dW comes from one
    # GEMM with fp32 accumulation and is added to W.grad with fp32 arithmetic.
    fp32_weight_grad: bool = False
    # Bitwise-equal results run after run on a GPU (prefops.determinism says what changes and what it costs).
    deterministic: bool = False


_settings = Settings()


def parse_bytes(value, *, name: str = "budget") -> int:
    """Accept an int (bytes) or a string such as '1GB', '512 MiB'."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '1GB', got {value!r}")
    if isinstance(value, (int, float)):
        nbytes = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must look like '1GB', '512MiB' or a byte count, got {value!r}")
        nbytes = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise TypeError(f"{name} must be a number of bytes or a string like '1GB', got {type(value).__name__}")
    if nbytes <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return nbytes


def check_choice(value: str, allowed: tuple, name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def get_settings() -> Settings:
    return _settings


def configure(*, strategy=None, budget=None, backend=None, workspace=None, lean_workspace=None,
              fp32_weight_grad=None, deterministic=None) -> Settings:
    """Change the global defaults; returns the previous settings."""
    global _settings
    previous = dataclasses.replace(_settings)
    new = dataclasses.replace(_settings)
    if strategy is not None:
        new.strategy = check_choice(strategy, STRATEGIES, "strategy")
    if budget is not None:
        new.budget = parse_bytes(budget, name="budget")
    if backend is not None:
        new.backend = check_choice(backend, BACKENDS, "backend")
    if workspace is not None:
        new.workspace = parse_bytes(workspace, name="workspace")
    if lean_workspace is not None:
        new.lean_workspace = parse_bytes(lean_workspace, name="lean_workspace")
    if fp32_weight_grad is not None:
        new.fp32_weight_grad = bool(fp32_weight_grad)
    if deterministic is not None:
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be True or False; got {deterministic!r}")
        new.deterministic = deterministic
    _settings = new
    return previous


@contextlib.contextmanager
def settings(**changes):
    """Temporarily change settings: `with prefops.settings(strategy="budget", budget="1GB"): ...`."""
    global _settings
    previous = configure(**changes)
    try:
        yield _settings
    finally:
        _settings = previous
