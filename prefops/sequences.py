"""Per-sequence reductions of per-token values, for both batch layouts.

Padded: values [B, T] with a bool mask [B, T] (True = counted token).
Packed (padding-free): flat values [N] with either cu_seqlens [S + 1]
(cumulative lengths, as flash-attn's varlen API) or seq_ids [N] (the sequence
index of each token; -1 marks a token that belongs to no sequence).
All reductions are differentiable and accumulate in fp32 (float64 input stays float64).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .determinism import index_add


class SequenceStats(NamedTuple):
    sum: torch.Tensor
    count: torch.Tensor
    mean: torch.Tensor


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Turn cumulative lengths [S + 1] into a sequence id per token [total]."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries; got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point:
        raise TypeError(f"cu_seqlens must be an integer tensor; got {cu_seqlens.dtype}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths < 0).any()) or int(cu_seqlens[0]) != 0:
        raise ValueError("cu_seqlens must start at 0 and never decrease")
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens[-1] = {int(cu_seqlens[-1])} must equal the number of tokens {total}")
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths.long())


def _segments(values, mask, cu_seqlens, seq_ids, num_sequences):
    """Return (flat fp32 values, flat fp32 mask, seq id per token, number of sequences)."""
    given = sum(x is not None for x in (cu_seqlens, seq_ids))
    if given > 1:
        raise ValueError("pass at most one of cu_seqlens and seq_ids")
    if mask is not None and tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}; got {tuple(mask.shape)}")
    # fp32 accumulation for half precision; float64 stays float64 for references.
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    weights = values.new_ones(values.shape, dtype=dtype) if mask is None else mask.to(dtype)
    if given == 0:
        if values.dim() != 2:
            raise ValueError(
                f"padded values must have shape [B, T]; got {tuple(values.shape)} "
                "(pass cu_seqlens or seq_ids for packed tokens)"
            )
        batch, length = values.shape
        ids = torch.arange(batch, device=values.device).repeat_interleave(length)
        return values.reshape(-1).to(dtype), weights.reshape(-1), ids, batch
    if values.dim() != 1:
        raise ValueError(f"packed values must be flat [N]; got shape {tuple(values.shape)}")
    if cu_seqlens is not None:
        ids = seq_ids_from_cu_seqlens(cu_seqlens.to(values.device), values.numel())
        count = cu_seqlens.numel() - 1
        return values.to(dtype), weights, ids, count
    if tuple(seq_ids.shape) != tuple(values.shape):
        raise ValueError(f"seq_ids must have the shape of values {tuple(values.shape)}; got {tuple(seq_ids.shape)}")
    ids = seq_ids.to(values.device).long()
    count = num_sequences if num_sequences is not None else (int(ids.max()) + 1 if ids.numel() else 0)
    if ids.numel() and (int(ids.max()) >= count or int(ids.min()) < -1):
        raise ValueError(f"seq_ids must lie in [-1, num_sequences={count})")
    keep = ids >= 0
    return values.to(dtype) * keep, weights * keep, ids.clamp_min(0), count


def sequence_stats(values, mask=None, *, cu_seqlens=None, seq_ids=None, num_sequences=None) -> SequenceStats:
    """Per-sequence sum, token count and mean of `values` over counted tokens.

    The mean of a sequence with no counted token raises, naming the sequence.
    """
    flat, weights, ids, count = _segments(values, mask, cu_seqlens, seq_ids, num_sequences)
    sums = index_add(flat.new_zeros(count), ids, flat * weights)
    counts = index_add(flat.new_zeros(count), ids, weights)
    empty = counts == 0
    if bool(empty.any()):
        raise ValueError(f"sequence {int(empty.nonzero()[0])} has no counted token, so its mean is undefined")
    return SequenceStats(sums, counts, sums / counts)


def sequence_sum(values, mask=None, *, cu_seqlens=None, seq_ids=None, num_sequences=None) -> torch.Tensor:
    flat, weights, ids, count = _segments(values, mask, cu_seqlens, seq_ids, num_sequences)
    return index_add(flat.new_zeros(count), ids, flat * weights)


def sequence_count(values, mask=None, *, cu_seqlens=None, seq_ids=None, num_sequences=None) -> torch.Tensor:
    _, weights, ids, count = _segments(values, mask, cu_seqlens, seq_ids, num_sequences)
    return index_add(weights.new_zeros(count), ids, weights)


def sequence_mean(values, mask=None, *, cu_seqlens=None, seq_ids=None, num_sequences=None) -> torch.Tensor:
    return sequence_stats(values, mask, cu_seqlens=cu_seqlens, seq_ids=seq_ids, num_sequences=num_sequences).mean
