"""Global settings for the fused ops: strategy, memory budget, backend.

`lean` keeps memory beyond the gradients independent of sequence length and
batch size (log-sum-exp in forward, logits recomputed blockwise in backward).
`budget` materialises the logits of whole loss groups (a pair, a list) when
they fit `budget` bytes and computes the gradients during forward, saving the
recompute GEMM. Both give the same values and gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

STRATEGIES = ("lean", "budget")
BACKENDS = ("auto", "triton", "torch")

_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


@dataclasses.dataclass
class Settings:
    strategy: str = "lean"
    budget: int = 1 << 30
    backend: str = "auto"
    # Scratch memory for lean mode: the fp32 dh accumulator of one row chunk
    # plus one tile of logit gradients. Fixed, so memory never grows with N.
    workspace: int = 160 << 20
    # Keep an fp32 copy of W.grad across row chunks even for bf16/fp16 weights
    # (exact, but costs V*H*4 bytes). Off: each row chunk's dW comes from one
    # GEMM with fp32 accumulation and is added to W.grad with fp32 arithmetic.
    fp32_weight_grad: bool = False


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


def configure(*, strategy=None, budget=None, backend=None, workspace=None, fp32_weight_grad=None) -> Settings:
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
    if fp32_weight_grad is not None:
        new.fp32_weight_grad = bool(fp32_weight_grad)
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
