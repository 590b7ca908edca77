"""Input validation shared by every public op: clear errors naming the argument.

Everything here runs before any kernel reads memory, so an out-of-range target
is reported instead of read out of bounds.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(value: torch.Tensor, name: str) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype {_dtype_names(FLOAT_DTYPES)}; got {value.dtype}")


def check_positive(value, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


class ValueCheck(NamedTuple):
    """A check of tensor values, run later with others so that all of them read the device once."""
    failed: torch.Tensor
    """0-dim bool, on the device of the values: whether the check fails."""
    fail: Callable[[], None]
    """Raises the error (free to read more values: it runs only on bad input)."""


def run_value_checks(checks: list[Optional[ValueCheck]]) -> None:
    """One host sync for every check (None entries skipped); the first that fails, in order, raises."""
    checks = [check for check in checks if check is not None]
    if not checks:
        return
    for check, failed in zip(checks, torch.stack([check.failed for check in checks]).tolist()):
        if failed:
            check.fail()


def check_targets_in_range(targets: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "targets") -> None:
    """Raise on any target outside [0, V) that is not ignore_index (one host sync)."""
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = int(targets[position])
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {value} at position {position} ({int(bad.sum())} such values)"
        )


def check_linear_inputs(hidden, weight, targets, bias, *, ignore_index, temperature, softcap):
    """Validate shapes, dtypes, devices and options of a fused linear op (metadata only, no sync).

    The value check of targets (check_targets_in_range) runs inside the op, so that
    torch.compile can trace the call without a graph break."""
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight")
    check_tensor(targets, "targets")
    check_float(hidden, "hidden")
    check_float(weight, "weight")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H]; got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H]; got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}; "
            f"got weight shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; put both on one device")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 or int32); got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},); got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    check_positive(temperature, "temperature")
    check_positive(softcap, "softcap", allow_none=True)
