"""The sequence-group reduction of context parallelism: every rank of a process group holds a share
of every sequence's tokens, and the per-sequence sums are all-reduced before any head reads them.

Every rank then evaluates the same loss of the global sums and differentiates it into its own
tokens only: h.grad is exact on each rank, and the weight gradients, each rank's share, must be
summed over the group (see sequence_all_reduce).
"""
from __future__ import annotations

import torch


def check_sequence_group(sequence_group):
    """sequence_group: None (each rank holds whole sequences) or an initialised ProcessGroup."""
    if sequence_group is None:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("sequence_group needs torch.distributed initialised (init_process_group)")
    if not isinstance(sequence_group, torch.distributed.ProcessGroup):
        raise TypeError(f"sequence_group must be a torch.distributed.ProcessGroup or None; "
                        f"got {type(sequence_group).__name__}")
    return sequence_group


class _SequenceSum(torch.autograd.Function):
    """Sum over the sequence group, with the identity as backward.

    Every rank evaluates the same loss L of the same global sums g = sum_r s_r, so
    d L / d s_r = d L / d g, which each rank already holds. The all-reduce of
    torch.distributed.nn.functional.all_reduce sums the upstream gradients as well: it
    differentiates sum_r L_r, the group size times L here, and would scale every gradient by it."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sequence_all_reduce(partial: torch.Tensor, sequence_group) -> torch.Tensor:
    """This rank's partial per-sequence sums -> the group's totals (partial itself without a group).

    Differentiable with the gradient of the one loss every rank computes from the totals: each rank
    backpropagates d loss / d total into its own tokens, so the gradients of shared parameters
    (the output weight) are per-rank shares that the caller sums over the group."""
    if sequence_group is None:
        return partial
    return _SequenceSum.apply(partial, sequence_group)


def _sum_over(sequence_group, values: dict) -> dict:
    """sequence_all_reduce of several same-shaped fp32 tensors in one collective."""
    if sequence_group is None:
        return values
    # Stacked by name: the ranks' dicts may come in other orders (built from sets, hashed per process).
    names = sorted(values)
    totals = sequence_all_reduce(torch.stack([values[name] for name in names]), sequence_group)
    return dict(zip(names, totals.unbind(0)))


def max_over_group(value: int, sequence_group, device) -> int:
    """The largest value over the group (a count of sequences every rank must agree on)."""
    if sequence_group is None:
        return value
    value = torch.tensor(value, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=sequence_group)
    return int(value)
