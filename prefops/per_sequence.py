"""Per-sequence helpers of the sequence-level objectives: the batch layout (padded, or flat tokens
with sequence ids and loss groups), per-token values summed per sequence, and gathered per group."""
from __future__ import annotations

import torch

from .determinism import index_add
from .sequence_group import max_over_group


def _check_layout(targets, seq_ids, groups, token_weights, sequence_group=None):
    padded = seq_ids is None
    if padded:
        if targets.dim() != 2:
            raise ValueError("seq_ids is required unless targets is a padded batch [B, T]")
        seq_ids = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
    if tuple(seq_ids.shape) != tuple(targets.shape):
        raise ValueError(f"seq_ids must have the shape of targets {tuple(targets.shape)}; got {tuple(seq_ids.shape)}")
    if seq_ids.dtype.is_floating_point:
        raise TypeError(f"seq_ids must be an integer tensor; got {seq_ids.dtype}")
    if not isinstance(groups, torch.Tensor) or groups.dim() != 2 or groups.dtype.is_floating_point:
        raise ValueError("groups must be an integer tensor [G, K] of sequence indices (-1 for an empty slot)")
    # Every bound in one host read; a padded batch's largest sequence index is its last row.
    bounds = {}
    if not padded and seq_ids.numel():
        bounds["seq_ids"] = seq_ids.max().long()
    if groups.numel():
        bounds["lowest group"], bounds["groups"] = torch.aminmax(groups.long())
    bounds = dict(zip(bounds, torch.stack(list(bounds.values())).tolist())) if bounds else {}
    last_row = targets.shape[0] - 1 if padded and targets.numel() else -1
    num_sequences = max(last_row, bounds.get("seq_ids", -1), bounds.get("groups", -1)) + 1
    # A rank may hold no token of the last sequences; the sums it reduces must have every rank's shape.
    num_sequences = max_over_group(num_sequences, sequence_group, targets.device)
    if bounds.get("lowest group", -1) < -1:
        raise ValueError("groups entries must be sequence indices >= 0, or -1 for an empty slot")
    if token_weights is not None and tuple(token_weights.shape) != tuple(targets.shape):
        raise ValueError(f"token_weights must have the shape of targets {tuple(targets.shape)}; "
                         f"got {tuple(token_weights.shape)}")
    return seq_ids.reshape(-1).long().to(targets.device), groups.long().to(targets.device), num_sequences


def _per_sequence(values, seq_ids, num_sequences):
    keep = seq_ids >= 0
    return index_add(values.new_zeros(num_sequences), seq_ids.clamp_min(0), torch.where(keep, values, 0.0))


def _gather(per_sequence, groups):
    """[S] -> [G, K], 0 in empty slots."""
    return torch.where(groups >= 0, per_sequence[groups.clamp_min(0)], 0.0)


def _stat_values(wanted, logp, entropy, sum_p2, mean_logit, top1):
    """Per-token values (detached) of the requested statistics, from one pass's outputs."""
    values = {"entropy": lambda: entropy.detach(), "logp": lambda: logp.detach(),
              "log_sum_p2": lambda: sum_p2.clamp_min(torch.finfo(torch.float32).tiny).log(),
              "mean_logit": lambda: mean_logit, "top1": lambda: top1.float()}
    return {name: values[name]() for name in wanted}


def _sequence_stats(values, counted, seq_ids, num_sequences):
    stats = {"count": _per_sequence(counted.float(), seq_ids, num_sequences)}
    for name, value in values.items():
        stats[name] = _per_sequence(torch.where(counted, value, 0.0), seq_ids, num_sequences)
    return stats
